"""The README's main job on real data, shortened: fetch the demo set, train LoRTA, LDDT-Cα rises.

The demo data comes from the package registry (the `demo_data` fixture in conftest.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_training_improves_validation_lddt(tmp_path, demo_data):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_fold.py"), "--config", "demo", "--adapter", "lorta",
           "--rank", "8", "--steps", "60", "--set", "train.val_every=0", "--set", "train.ckpt_every=0",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(run), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["val_lddt_ca_final"] > summary["val_lddt_ca_initial"]
    assert summary["trainable_parameters"]["adapter"] == 8 * (320 + 16 + 20 + 6 + 4)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "training_curves.png").is_file()
