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


def test_esm_attention_runs_each_cell_in_its_own_limited_process(smoke_runs):
    folder, _ = smoke_runs
    data = json.loads((folder / "esm_attention.json").read_text())
    assert data["config"]["memory_limit_gib"] > 0
    cells = [m for r in data["results"] for m in r["lengths"].values()]
    assert cells and all(m["status"] == "ok" and m["process_seconds"] > 0 for m in cells)
    assert all(v["status"] == "ok" and v["seconds_per_step"]["n"] == data["config"]["repeats"]
               for m in cells for v in m["variants"].values())


def test_esm_attention_records_a_variant_out_of_memory_and_measures_the_other(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import esm_attention
        from report import read_esm_attention
    finally:
        sys.path.remove(str(BENCH))
    make_steps = esm_attention.make_steps

    def original_runs_out(*args, **kwargs):
        steps, final = make_steps(*args, **kwargs)

        def oom():
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return dict(steps, original=oom), final

    monkeypatch.setattr(esm_attention, "make_steps", original_runs_out)
    spec = dict(shape="tiny", layers=1, d_model=32, heads=2, length=16, conf=dict(repeats=1, steps=1, warmup=1),
                bf16=False, seed=0, device="cpu")
    cell = esm_attention.run_cell(spec)
    assert cell["status"] == "partial" and "ratios" not in cell
    assert cell["variants"]["original"]["status"] == "out_of_memory"
    assert cell["variants"]["sdpa"]["status"] == "ok" and cell["variants"]["sdpa"]["transient_bytes"] > 0
    result = dict(shape="tiny", d_model=32, heads=2, layers=1, layers_full=1, batch=1, bf16=False,
                  lengths={"16": cell})
    (table,) = esm_attention.tables([result], esm_attention.torch.device("cpu"), spec["conf"], 4.0)
    assert table["rows"][0][3] == "out of memory (> 4 GiB)" and table["rows"][0][4] != "–"
    targets, reading = read_esm_attention({"results": [result]})
    assert targets == [] and "tiny, L=16: original out of memory" in reading


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


def test_run_settings_come_from_the_device_defaults_the_smoke_set_and_the_flags():
    from argparse import Namespace

    sys.path.insert(0, str(BENCH))
    try:
        from common import SMOKE_RUNS, run_conf
    finally:
        sys.path.remove(str(BENCH))
    defaults = dict(repeats=5, steps=2, warmup=1, crop=64)
    assert run_conf(Namespace(smoke=False, repeats=0, steps=0), defaults) == defaults  # 0: keep
    assert run_conf(Namespace(smoke=False, repeats=7, crop=32), defaults) == dict(defaults, repeats=7, crop=32)
    assert run_conf(Namespace(smoke=True, repeats=0), defaults) == SMOKE_RUNS
    assert run_conf(Namespace(smoke=True, repeats=4), defaults, smoke=dict(SMOKE_RUNS, crop=16)) == dict(
        SMOKE_RUNS, repeats=4, crop=16)
    assert defaults == dict(repeats=5, steps=2, warmup=1, crop=64)  # not changed in place
