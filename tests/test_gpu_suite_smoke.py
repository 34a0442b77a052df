"""bench/gpu_suite.py runs end to end on CPU (`--device cpu --smoke`): every section, JSON and tables.

The smoke mode is the GPU suite's code on tiny shapes: the folding steps with their FLOP count, the
ESM-2 adapter steps, prediction against fair-esm's ESMFold.infer on the same weights (with the
out-of-memory fallback to a chunked trunk, simulated once), a 2-process DDP run over gloo, and the
folding step and a prediction with model.compile (dynamo's eager backend: graphs captured, no code
generated). What it cannot run here: NCCL, inductor's GPU code and the GPU's peak-FLOPS lookup (the
utilisation stays empty).
"""

import json
from pathlib import Path

import pytest

import background

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a fresh interpreter, two DDP processes: about a minute, more on a busy machine


@background.job("gpu_suite")
def gpu_suite_smoke(folder):
    out = folder / "gpu_suite.json"
    return {"out": out, "proc": background.run(ROOT / "bench" / "gpu_suite.py", "--device", "cpu", "--smoke",
                                               "--out", out)}


@pytest.fixture(scope="module")
def smoke():
    job = background.result("gpu_suite")
    proc = job["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(job["out"].read_text()), proc.stdout


def test_every_section_ran_and_tables_are_printed_last(smoke):
    data, stdout = smoke
    assert data["benchmark"] == "gpu_suite" and data["smoke"] is True
    assert data["sections"] == ["fold", "lm", "predict", "ddp", "compile"]
    assert set(data["section_seconds"]) == set(data["sections"])
    assert len(data["tables"]) == 7 and all(t["rows"] for t in data["tables"])
    for table in data["tables"]:
        assert f"**{table['title']}**" in stdout
    assert stdout.rstrip().endswith(data["tables"][-1]["notes"][-1])


def test_fold_steps_have_time_memory_and_counted_flops(smoke):
    data, _ = smoke
    fold = data["fold"]
    assert set(fold["variants"]) == {"none", "lora r=1", "lorta r=8", "full"}
    assert fold["peak_bf16_flops"] is None  # a CPU has no entry in the peak table
    counted = []
    for name, v in fold["variants"].items():
        assert v["seconds_per_step"]["n"] == fold["config"]["repeats"] and v["seconds_per_step"]["median"] > 0
        assert v["peak_bytes"] > 0 and v["max_memory_allocated"] is None  # CUDA only
        assert v["flops_per_step"] > 0 and v["achieved_flops_per_s"] > 0 and v["mfu"] is None
        counted.append(v["flops_include_recomputation"])
    # the simulated out-of-memory made one count fall back to checkpointing (recomputation included)
    assert "flops" in data["simulated_out_of_memory"] and counted.count(True) == 1
    v = fold["variants"]
    assert v["full"]["trainable_parameters"] > v["lora r=1"]["trainable_parameters"] > v["none"]["trainable_parameters"]
    assert v["full"]["flops_per_step"] > v["lorta r=8"]["flops_per_step"]  # LM weight gradients cost FLOPs


def test_lm_adapter_steps_cover_every_variant(smoke):
    data, _ = smoke
    (shape,) = data["lm"]["results"]
    assert set(shape["variants"]) == {"floor", "LoRA r=1", "LoRA r=8", "LoRTA r=1", "LoRTA r=8", "LoRTA r=64",
                                      "LoRTA r=8 dense"}
    for name, v in shape["variants"].items():
        assert v["peak_bytes"] > 0 and (name == "floor" or v["above_floor_bytes"] > 0)
    assert shape["ratios"]["LoRTA/LoRA r=8 time"]["median"] > 0


def test_prediction_matches_fair_esm_on_the_same_weights(smoke):
    data, _ = smoke
    pred = data["predict"]
    assert list(pred["lengths"]) == ["16", "24"]
    assert pred["lengths"]["16"]["chunk_size"] is None
    assert pred["lengths"]["24"]["chunk_size"] == 4  # the simulated out-of-memory: run again chunked
    lm = pred["lm_parameter_bytes"]
    assert lm["ours"] == 2 * lm["ours, bf16 LM"]  # on CPU fair-esm's LM is made float32 again (esm-fold --cpu-only)
    for length in pred["lengths"].values():
        v = length["variants"]
        assert set(v) == {"fair-esm infer", "ours", "ours, bf16 LM", "ours, LM offloaded"}
        assert v["ours, LM offloaded"]["max_abs_ca_deviation_from_fair_esm"] < 1e-3  # --cpu-offload: the same
        assert all(x["seconds_per_prediction"]["median"] > 0 and x["peak_bytes"] > 0 for x in v.values())
        assert v["ours, bf16 LM"]["peak_bytes"] < v["ours"]["peak_bytes"]
        assert v["ours"]["max_abs_ca_deviation_from_fair_esm"] < 1e-3  # the same function, float32 both
        assert v["ours, bf16 LM"]["max_abs_ca_deviation_from_fair_esm"] < 0.5


def test_ddp_keeps_the_processes_identical(smoke):
    data, _ = smoke
    ddp = data["ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 2
    assert ddp["seconds_per_step"] > 0 and ddp["trainable_parameters"] > 0
    assert ddp["max_parameter_spread_across_processes"] == 0.0


def test_compiled_variants_run_the_eager_function(smoke):
    data, _ = smoke
    c = data["compile"]
    assert c["backend"] == "eager"
    fold, predict = c["fold"], c["predict"]
    assert fold["order"] == ["none", "trunk", "both"] and predict["order"] == ["none", "trunk"]
    for part in (fold, predict):
        for name in part["order"]:
            v = part["variants"][name]
            assert v["seconds_per_step"]["n"] == part["config"]["repeats"] and v["step_memory_bytes"] > 0
            if name != "none":
                assert v["compile_wall_seconds"] > 0 and v["vs_eager"]["median"] > 0
                assert v["output_scale"] > 0 and v["max_abs_output_difference"] <= 1e-4 * v["output_scale"]
    assert fold["variants"]["both"]["max_rel_factor_gradient_difference"] <= 1e-4
    assert predict["variants"]["trunk"]["max_rel_factor_gradient_difference"] is None  # no gradients in prediction
