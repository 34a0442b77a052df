"""The benchmark scripts run end to end on their smallest shapes, print their tables and write their JSON.

This checks that `make bench` works, not what it measures: `--smoke` shapes are tiny and their
timings mean nothing. Each script runs once (module fixture) in a subprocess, as run_all runs it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = ("adapter_step", "adapter_profile", "merged_inference", "fold_step", "predict_throughput", "esm_attention")


def run_script(name, out: Path, *extra):
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--device", "cpu", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "cpu-smoke"
    runs = {name: run_script(name, folder / f"{name}.json", *(["--profile"] if name == "adapter_profile" else []))
            for name in SCRIPTS}
    return folder, runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_writes_json_and_prints_its_tables_last(smoke_runs, name):
    folder, runs = smoke_runs
    proc = runs[name]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["smoke"] is True
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["clock"] == "cpu"
    assert data["tables"] and all(t["rows"] for t in data["tables"])
    last = data["tables"][-1]
    assert proc.stdout.rstrip().endswith(last["notes"][-1] if last.get("notes") else "|")
    for table in data["tables"]:
        assert f"**{table['title']}**" in proc.stdout


def test_adapter_step_covers_every_variant_with_memory(smoke_runs):
    folder, _ = smoke_runs
    data = json.loads((folder / "adapter_step.json").read_text())
    (result,) = data["results"]
    assert set(result["variants"]) == {"floor", "LoRA r=1", "LoRA r=8", "LoRTA r=1", "LoRTA r=8", "LoRTA r=64",
                                       "LoRTA r=8 dense"}
    for name, v in result["variants"].items():
        assert v["seconds_per_step"]["n"] == data["config"]["repeats"]
        assert v["peak_bytes"] > 0
        assert name == "floor" or v["above_floor_bytes"] > 0
    assert result["memory_sweep"]


def test_report_renders_every_section(smoke_runs):
    folder, _ = smoke_runs
    sys.path.insert(0, str(BENCH))
    try:
        from report import load_runs, render
    finally:
        sys.path.remove(str(BENCH))
    runs = load_runs(folder.parent, include_smoke=True)
    text = render(runs)
    for title in ("1. Adapter step cost", "1b. The adapters alone", "2. Merged inference", "3. Folding step",
                  "4. Prediction throughput", "5. Long sequences: ESM-2 attention through SDPA", "**Targets**"):
        assert title in text


def test_run_all_writes_run_json_and_markdown_elsewhere_in_smoke_mode(tmp_path):
    before = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--smoke", "--device", "cpu",
                           "--results-root", str(tmp_path), "--only", "adapter_profile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = json.loads((folder / "run.json").read_text())
    assert [b["script"] for b in run["benchmarks"]] == ["adapter_profile.py"]
    assert "1b. The adapters alone" in (tmp_path / "BENCHMARKS.md").read_text()
    after = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    assert before == after
