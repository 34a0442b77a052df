"""The NLP benchmarks run on tiny shapes, and our LoRA is PEFT's LoRA when both hold the same factors.

Hugging Face PEFT is not a dependency of the project: where it is missing, the adapter-step smoke
run goes without its variants (--no-peft) and the parity tests are skipped; our variants always run.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import background
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HAVE_PEFT = importlib.util.find_spec("peft") is not None


def run_script(name, *args, env=None):
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@background.job("nlp_bench")
def nlp_bench_smoke(folder):
    step = background.run(BENCH / "nlp_adapter_step.py", "--device", "cpu", "--smoke", "--out", folder / "step.json",
                          *([] if HAVE_PEFT else ["--no-peft"]))
    dpo = background.run(BENCH / "nlp_dpo_reference.py", "--device", "cpu", "--smoke", "--out", folder / "dpo.json")
    return {"folder": folder, "nlp_adapter_step": step, "nlp_dpo_reference": dpo}


@pytest.fixture(scope="module")
def smoke():
    job = background.result("nlp_bench")
    for name in ("nlp_adapter_step", "nlp_dpo_reference"):
        proc = job[name]
        assert proc.returncode == 0, name + ": " + proc.stdout[-2000:] + proc.stderr[-4000:]
    folder = job["folder"]
    runs = {name: job[name] for name in ("nlp_adapter_step", "nlp_dpo_reference")}
    return json.loads((folder / "step.json").read_text()), json.loads((folder / "dpo.json").read_text()), runs


@pytest.fixture(scope="module")
def step_module():
    nlp_adapter_step = bench_module("nlp_adapter_step")
    return nlp_adapter_step


def test_adapter_step_smoke_measures_every_variant(smoke, step_module):
    data, _, runs = smoke
    assert data["benchmark"] == "nlp_adapter_step" and data["smoke"] and data["machine"]["clock"] == "cpu"
    assert [r["shape"] for r in data["results"]] == list(step_module.SMOKE_SHAPES)
    want = step_module.variant_names(HAVE_PEFT)
    for r in data["results"]:
        assert list(r["variants"]) == want
        for name, v in r["variants"].items():
            assert v["seconds_per_step"]["n"] == data["config"]["repeats"] and v["peak_bytes"] > 0
            assert name == "floor" or (v["above_floor_bytes"] > 0 and v["trainable_parameters"] > 0)
        for rank in step_module.RANKS:  # LoRA: r·(in + out) per matrix; GQA's k and v are narrower
            d, kv_width = r["d_model"], r["kv_heads"] * r["d_model"] // r["heads"]
            per_layer = rank * ((d + d) * 2 + (d + kv_width) * 2)
            assert r["variants"][f"ours LoRA r={rank}"]["trainable_parameters"] == r["layers"] * per_layer
        if HAVE_PEFT:
            assert r["parity"]["ok"] and r["parity"]["max_abs_change_from_frozen"] > 1e-3
            assert set(r["ratios"]) == {f"ours {m}/PEFT LoRA r={k} {what}" for m in ("LoRA", "LoRTA")
                                        for k in step_module.RANKS for what in ("time", "memory above floor")}
        else:
            assert r["parity"] is None and not r["ratios"]
    out = runs["nlp_adapter_step"].stdout
    assert all(f"**{t['title']}**" in out for t in data["tables"])


def test_dpo_reference_smoke_is_exact_and_the_copy_costs_the_weights(smoke):
    _, data, runs = smoke
    assert data["benchmark"] == "nlp_dpo_reference" and data["machine"]["clock"] == "cpu"
    c, v = data["checks"], data["variants"]
    assert c["disabled_adapter_equals_frozen"] and c["deep_copy_equals_frozen"] and c["adapter_changes_policy_logps"]
    # what the deep-copy variant keeps beyond the disabled-adapter one is exactly the frozen model's tensors
    assert v["deep copy"]["resident_bytes"] - v["adapter disabled"]["resident_bytes"] == \
        data["memory"]["base_weight_bytes"] > 0
    assert v["cached"]["resident_bytes"] - v["adapter disabled"]["resident_bytes"] == \
        data["memory"]["cache_bytes_per_pair"] * data["pairs"]
    for name in ("adapter disabled", "deep copy", "cached", "reference forward alone"):
        assert v[name]["seconds"]["n"] == data["config"]["repeats"] and v[name]["peak_bytes"] > 0
    assert all(f"**{t['title']}**" in runs["nlp_dpo_reference"].stdout for t in data["tables"])


def test_report_renders_the_nlp_sections(smoke, tmp_path):
    step, dpo, _ = smoke
    folder = tmp_path / "cpu-smoke"
    folder.mkdir()
    (folder / "nlp_adapter_step.json").write_text(json.dumps(step))
    (folder / "nlp_dpo_reference.json").write_text(json.dumps(dpo))
    report = bench_module("report")
    load_runs, render = report.load_runs, report.render
    text = render(load_runs(tmp_path, include_smoke=True))
    assert "### 8. NLP adapters against Hugging Face PEFT" in text
    assert "### 9. DPO reference: the adapter disabled against a copy" in text
    assert "disabled-adapter reference" in text and "**Targets**" in text


@background.job("nlp_bench_without_peft")
def without_peft(folder):
    fake = folder / "peft"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('peft hidden by the test')\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(folder))
    return run_script("nlp_adapter_step", "--smoke", "--out", str(folder / "x.json"), env=env), folder


def test_missing_peft_is_one_error_line():
    proc, folder = background.result("nlp_bench_without_peft")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install peft" in lines[0]
    assert not (folder / "x.json").exists()


# --- parity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "mpnet", "llama"])
def test_our_lora_is_peft_lora_with_the_same_factors(step_module, family):
    pytest.importorskip("peft")
    import torch

    from esmfold_peft.adapters import LoRAConfig, add_adapter, detect_layout

    m = step_module
    kind = "causal" if family == "llama" else "classify"
    fields = dict(m.TINY, **({"num_key_value_heads": 2} if family == "llama" else {}))
    model = m.build_model(m.hf_config(family, kind, fields), kind, torch.device("cpu"), seed=0)
    layout = detect_layout(model)
    theirs = m.add_peft_lora(model, layout, rank=4)
    wrapped = {n for n, mod in theirs.get_base_model().named_modules() if hasattr(mod, "lora_A")}
    assert wrapped == {layout.projection_path(l, x) for l in range(layout.n_layers) for x in "qkvo"}
    add_adapter(model, LoRAConfig(rank=4, alpha=4), name="lora")
    inputs = m.random_inputs(model.config, kind, 2, 12, torch.device("cpu"), seed=1)
    check = m.parity(model, "lora", theirs, layout, inputs, seed=2)
    assert check["ok"] and check["max_abs_change_from_frozen"] > 1e-2, check
    # the check can fail: one factor entry off in PEFT's copy shows
    with torch.no_grad():
        m.peft_module(theirs, layout, 0, "v").lora_B["default"].weight[0, 0] += 0.5
        ours_out = m.model_output(model.eval(), inputs)
        their_out = m.model_output(theirs.eval(), inputs)
    assert (ours_out - their_out).abs().max() > 1e-3
