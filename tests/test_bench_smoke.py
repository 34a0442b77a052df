"""The benchmark scripts run end to end on their smallest shapes, print their tables and write their JSON.

This checks that `make bench` works, not what it measures: `--smoke` shapes are tiny and their
timings mean nothing. Everything runs once, in the background from the start of the session
(tests/background.py): `run_all.py --smoke` runs each script of `make bench` in its own process, as
`make bench` does, into a results folder of its own (BENCHMARKS.md untouched); bench/esm_attention.py
(part of `make bench-long`) runs after it into the same folder. bench/mixed_adapters.py (`make bench-mixed`)
runs as a job of its own, with PEFT's variants where peft is installed.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

import background
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = ("adapter_step", "adapter_profile", "merged_inference", "fold_step", "predict_throughput", "esm_attention")
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_PEFT = HAVE_TRANSFORMERS and importlib.util.find_spec("peft") is not None


@background.job("bench")
def bench_smoke(folder: Path) -> dict:
    """`make bench`'s scripts through run_all.py (own results root, BENCHMARKS.md untouched), then
    esm_attention.py (part of `make bench-long`) into the same machine folder."""
    before = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    everything = background.run(BENCH / "run_all.py", "--smoke", "--device", "cpu", "--results-root", folder)
    after = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    machines = [p for p in folder.iterdir() if p.is_dir()]
    attention = None
    if len(machines) == 1:
        attention = background.run(BENCH / "esm_attention.py", "--smoke", "--device", "cpu", "--out",
                                   machines[0] / "esm_attention.json")
    return {"machines": machines, "run_all": everything, "esm_attention": attention,
            "benchmarks_md_untouched": before == after}


@pytest.fixture(scope="module")
def smoke_runs():
    """(the results folder, {script: its printed output}, run_all's process), from the run the session started."""
    job = background.result("bench")
    everything = job["run_all"]
    assert everything.returncode == 0, everything.stdout[-3000:] + everything.stderr[-4000:]
    assert job["benchmarks_md_untouched"]
    (folder,) = job["machines"]
    scripts_output = everything.stdout.split(f"\nwrote {folder}/ and ")[0]  # without run_all's own closing lines
    printed = {chunk.split(".py ===", 1)[0]: chunk for chunk in scripts_output.split("\n=== ")[1:]}
    attention = job["esm_attention"]
    assert attention.returncode == 0, attention.stdout[-2000:] + attention.stderr[-4000:]
    printed["esm_attention"] = attention.stdout
    return folder, printed, everything


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_writes_json_and_prints_its_tables_last(smoke_runs, name):
    folder, printed, _ = smoke_runs
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["smoke"] is True
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["clock"] == "cpu"
    assert data["tables"] and all(t["rows"] for t in data["tables"])
    last = data["tables"][-1]
    assert printed[name].rstrip().endswith(last["notes"][-1] if last.get("notes") else "|")
    for table in data["tables"]:
        assert f"**{table['title']}**" in printed[name]


def test_adapter_step_covers_every_variant_with_memory(smoke_runs):
    folder, _, _ = smoke_runs
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
    folder, _, _ = smoke_runs
    data = json.loads((folder / "esm_attention.json").read_text())
    assert data["config"]["memory_limit_gib"] > 0
    cells = [m for r in data["results"] for m in r["lengths"].values()]
    assert cells and all(m["status"] == "ok" and m["process_seconds"] > 0 for m in cells)
    assert all(v["status"] == "ok" and v["seconds_per_step"]["n"] == data["config"]["repeats"]
               for m in cells for v in m["variants"].values())


def test_esm_attention_records_a_variant_out_of_memory_and_measures_the_other(monkeypatch):
    esm_attention = bench_module("esm_attention")
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
    targets, reading = esm_attention.read_esm_attention({"results": [result]})  # its section of BENCHMARKS.md
    assert targets == [] and "tiny, L=16: original out of memory" in reading


def test_report_renders_every_section(smoke_runs):
    folder, _, _ = smoke_runs
    report = bench_module("report")
    load_runs, render = report.load_runs, report.render
    runs = load_runs(folder.parent, include_smoke=True)
    text = render(runs)
    for title in ("1. Adapter step cost", "1b. The adapters alone", "2. Merged inference", "3. Folding step",
                  "4. Prediction throughput", "5. Long sequences: ESM-2 attention through SDPA", "**Targets**"):
        assert title in text


def test_run_all_writes_run_json_and_markdown_elsewhere_in_smoke_mode(smoke_runs):
    folder, _, everything = smoke_runs
    run = json.loads((folder / "run.json").read_text())
    assert [b["script"] for b in run["benchmarks"]] == [f"{n}.py" for n in SCRIPTS[:-1]]
    assert all(b["returncode"] == 0 for b in run["benchmarks"])
    assert "1b. The adapters alone" in (folder.parent / "BENCHMARKS.md").read_text()
    assert "**Targets**" in everything.stdout


def test_esm_attention_compares_the_same_function(smoke_runs):
    folder, _, _ = smoke_runs
    data = json.loads((folder / "esm_attention.json").read_text())
    for result in data["results"]:
        for m in result["lengths"].values():
            assert set(m["variants"]) == {"original", "sdpa"}
            assert m["max_abs_diff_final_representation"] < 1e-4
            assert all(v["transient_bytes"] > 0 for v in m["variants"].values())


def test_run_settings_come_from_the_device_defaults_the_smoke_set_and_the_flags():
    from argparse import Namespace

    common = bench_module("common")
    SMOKE_RUNS, run_conf = common.SMOKE_RUNS, common.run_conf
    defaults = dict(repeats=5, steps=2, warmup=1, crop=64)
    assert run_conf(Namespace(smoke=False, repeats=0, steps=0), defaults) == defaults  # 0: keep
    assert run_conf(Namespace(smoke=False, repeats=7, crop=32), defaults) == dict(defaults, repeats=7, crop=32)
    assert run_conf(Namespace(smoke=True, repeats=0), defaults) == SMOKE_RUNS
    assert run_conf(Namespace(smoke=True, repeats=4), defaults, smoke=dict(SMOKE_RUNS, crop=16)) == dict(
        SMOKE_RUNS, repeats=4, crop=16)
    assert defaults == dict(repeats=5, steps=2, warmup=1, crop=64)  # not changed in place


# --- bench/mixed_adapters.py (`make bench-mixed`) ------------------------------------------------------

@background.job("bench_mixed")
def bench_mixed_smoke(folder: Path) -> dict:
    """The mixed-adapter benchmark on its smoke sizes (a tiny ESM-2, 4 records, 1, 2 and 4 distinct adapters)."""
    out = folder / "mixed_adapters.json"
    return {"out": out, "run": background.run(BENCH / "mixed_adapters.py", "--smoke", "--device", "cpu", "--out", out)}


@pytest.fixture(scope="module")
def mixed_smoke():
    job = background.result("bench_mixed")
    proc = job["run"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(job["out"].read_text()), proc.stdout, bench_module("mixed_adapters")


def test_mixed_adapters_measures_every_cell_and_prints_its_tables_last(mixed_smoke):
    data, printed, mixed = mixed_smoke
    assert data["benchmark"] == "mixed_adapters" and data["smoke"] is True
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["clock"] == "cpu"
    r = data["result"]
    assert r["adapters"] == list(mixed.SMOKE_ADAPTERS) and r["records"] >= max(r["adapters"])
    assert list(r["mixed"]) == [name for name, _ in mixed.mixed_variants(HAVE_TRANSFORMERS, HAVE_PEFT)]
    assert set(r["references"]) == {mixed.FLOOR, mixed.SINGLE} | ({mixed.HF_BASE} if HAVE_TRANSFORMERS else set())
    cells = [c for v in r["mixed"].values() for c in v.values()] + list(r["references"].values())
    assert all(list(v) == [str(k) for k in r["adapters"]] for v in r["mixed"].values())
    assert all(c["records_per_s"]["n"] == data["config"]["repeats"] and c["records_per_s"]["median"] > 0
               for c in cells)
    assert (data["peft"] is not None) == HAVE_PEFT and (not data["skipped"]) == HAVE_PEFT
    last = data["tables"][-1]
    assert printed.rstrip().endswith(last["notes"][-1])
    assert all(f"**{t['title']}**" in printed and t["rows"] for t in data["tables"])


def test_mixed_adapters_compares_the_same_function_and_counts_the_bytes(mixed_smoke):
    data, _, mixed = mixed_smoke
    r = data["result"]
    checks = r["checks"]
    assert all(c["ok"] for c in checks.values())
    moved = [c["max_abs_change_from_base"] for c in checks.values() if c["max_abs_change_from_base"] is not None]
    assert moved and min(moved) > 1e-2  # the adapters visibly change the outputs, or the checks prove nothing
    assert any(mixed.SPLIT in name for name in checks) and any(mixed.MIXED in name for name in checks)
    mem = r["memory"]
    L, d, H = mem["layers"], mem["d_model"], mem["heads"]
    a = mem["adapters"]
    assert a["ours LoRTA r=8"]["parameters"] == 8 * (d + d // H + H + L + 4)
    for rank in mixed.LORA_RANKS:
        assert a[f"ours LoRA r={rank}"]["parameters"] == L * 4 * rank * 2 * d
        if HAVE_PEFT:
            assert a[f"PEFT LoRA r={rank}"]["parameters"] == a[f"ours LoRA r={rank}"]["parameters"]
    for name, x in a.items():
        assert x["largest_library_1gib"] == int(2 ** 30 // x["device_bytes"])
        if name.startswith("ours"):  # one copy, in the stacks: a slot holds the factors (LoRTA's C_M padded to 4)
            assert x["device_bytes"] == x["stacked_bytes"] >= x["factor_bytes"]
            assert x["stacked_bytes"] <= x["allocated_bytes"] <= 2 * x["stacked_bytes"] + 1e-9


def test_mixed_adapters_reading_computes_the_goals_from_the_json(mixed_smoke):
    data, _, mixed = mixed_smoke
    targets, reading = mixed.read_mixed_adapters(data)
    assert targets == [] and "this run measured K = 1, 2, 4" in reading  # the goals' cells are not in a smoke run
    # the same run relabelled as the cells, with chosen ratios: the verdicts follow the numbers
    d = copy.deepcopy(data)
    r = d["result"]
    r["adapters"] = [1, 64, 512]
    for variant, cells in r["mixed"].items():
        r["mixed"][variant] = {str(k): copy.deepcopy(cells["1"]) for k in r["adapters"]}
    r["ratios"] = {**{str(k): copy.deepcopy(r["ratios"]["1"]) for k in r["adapters"]},
                   **{k: v for k, v in r["ratios"].items() if not k.isdigit()}}
    chosen = {"1": (0.9, 0.8, 1.0), "64": (0.85, 0.8, 0.9), "512": (0.5, 0.45, 0.55)}
    for k, (med, lo, hi) in chosen.items():
        r["mixed"][mixed.MIXED][k]["vs_single"] = {"median": med, "min": lo, "max": hi, "n": 3, "values": [lo, med, hi]}
    targets, reading = mixed.read_mixed_adapters(d)
    verdicts = {row[0]: row[3] for row in targets}
    assert verdicts[next(t for t in verdicts if "64 distinct" in t)] == "met"
    assert verdicts[next(t for t in verdicts if "512 distinct" in t)] == "missed"
    assert "*Where the goal is missed.* at K=512 the median is 0.50 against 0.6" in reading
    assert len(targets) == 2 + (len(mixed.LORA_RANKS) if HAVE_PEFT else 0)
