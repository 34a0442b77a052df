"""Prediction sharded over 2 CPU processes (torchrun, gloo): one merged predictions.json, the same files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from esmfold_peft.fold.predict import PART_FILE, predict_fasta
from esmfold_peft.runtime.errors import EXIT_OK
from esmfold_peft.fold.train import train
from fold_fixtures import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "predict.py"
RECORDS = {"a": "MKTAYIAKQRQISFVKSHFSRQ", "b": "GSHMLEDPXKRWAC", "dimer": "MKTAYIAK:DPWERSHLNV", "c": "ACDEFGHIKL",
           "d": "MKTAYIAKQRQISF", "e": "NIAEVCMDNIAEVCMDWW"}


def test_torchrun_shards_records_and_rank_0_merges_one_summary(tmp_path):
    assert train(tiny_run_config(tmp_path, adapter="lorta", steps=2), tmp_path / "run", progress=False) == EXIT_OK
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in RECORDS.items()) + ">bad\nMK--T\n")
    # one record per batch, so that the shards' batches are the single process's batches
    # --run-dir: torchrun's own parser would take --run for its --run-path
    common = ["--fasta", str(fasta), "--run-dir", str(tmp_path / "run"), "--max-tokens-per-batch", "1", "--quiet",
              "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + [str(SCRIPT)] + common + ["--out", str(tmp_path / "ddp")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad record: some inputs failed
    assert proc.stdout.count("wrote 6 structure(s)") == 1 and "by 2 processes" in proc.stdout
    assert proc.stderr.count("skipping FASTA record bad (line 13)") == 1  # logged by rank 0 only
    assert proc.stderr.count("  bad (line 13): invalid character") == 1  # and reported once

    summary = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert [p["id"] for p in summary["predictions"]] == list(RECORDS)  # every record once, in FASTA order
    assert summary["n_predicted"] == 6 and summary["n_failed"] == 1 and summary["n_not_reached"] == 0
    assert [f["id"] for f in summary["failures"]] == ["bad"]
    assert summary["adapter_merged"] and summary["merge_check"]["ok"] and summary["merge_check"]["n_sequences"] == 2
    assert not list((tmp_path / "ddp").glob(PART_FILE.format(rank="*", world="*")))  # parts merged and removed

    # the same FASTA in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = predict_fasta(fasta, tmp_path / "run", tmp_path / "single", max_tokens_per_batch=1, progress=False,
                               device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert [p["id"] for p in single.predicted] == list(RECORDS)
    ddp_files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert ddp_files == sorted(p.name for p in (tmp_path / "single").iterdir())
    for record in single.predicted:
        assert (tmp_path / "ddp" / record["pdb"]).read_text() == (tmp_path / "single" / record["pdb"]).read_text()
        ddp_record = json.loads((tmp_path / "ddp" / record["pdb"].replace(".pdb", ".json")).read_text())
        assert abs(ddp_record["mean_plddt"] - record["mean_plddt"]) < 1e-6
        assert ddp_record["ptm"] is None and record["ptm"] is None  # the tiny run never trained its pTM head
        assert ddp_record["plddt_per_residue"] == record["plddt_per_residue"]


def test_torchrun_serves_an_adapter_library_as_one_process_does(tiny_lorta_run, tmp_path):
    """Each process routes its share of a mixed FASTA through the same library: the files equal one process's."""
    from esmfold_peft.adapters import LoRTAConfig, add_adapter, save_adapter, unload
    from esmfold_peft.fold.predict.library import LibraryOptions
    from esmfold_peft.fold.run.checkpoint import load_trained_model

    for i, name in enumerate(("one", "two")):  # entries made for the run's weights, its own adapter merged
        model, _ = load_trained_model(tiny_lorta_run)
        unload(model.esm, merge=True)
        adapter = add_adapter(model.esm, LoRTAConfig(rank=2, alpha=4))
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
        save_adapter(model.esm, tmp_path / "lib" / name / "adapter")
    fasta = tmp_path / "in.fasta"
    picks = ["one", "two", "base", "one", "two", "base"]
    fasta.write_text("".join(f">{k} adapter={a}\n{v}\n" for (k, v), a in zip(RECORDS.items(), picks)))
    common = ["--fasta", str(fasta), "--run-dir", str(tiny_lorta_run), "--no-progress", "--device", "cpu",
              "--adapter-library", str(tmp_path / "lib")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(launcher + [str(SCRIPT)] + common + ["--out", str(tmp_path / "ddp")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = predict_fasta(fasta, tiny_lorta_run, tmp_path / "single", progress=False, device="cpu",
                               library=LibraryOptions(tmp_path / "lib"))
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert [p["adapter"] for p in summary["predictions"]] == picks == [p["adapter"] for p in single.predicted]
    def xyz(path):
        return torch.tensor([[float(line[i:i + 8]) for i in (30, 38, 46)] for line in path.read_text().splitlines()
                             if line.startswith("ATOM")])

    for record in single.predicted:  # batches differ by shard: float rounding, and the PDB's 3 decimals, at most
        one, ddp = xyz(tmp_path / "single" / record["pdb"]), xyz(tmp_path / "ddp" / record["pdb"])
        assert one.shape == ddp.shape and float((one - ddp).abs().max()) <= 2e-3, record["id"]
