"""scripts/predict.py and esmfold_peft.fold.predict on a tiny trained run (nothing downloaded)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from Bio.PDB import PDBParser

import esmfold_peft.fold.predict.job as predict_module  # where a batch is predicted (and split on OOM)
from esmfold_peft.adapters import get_adapter_set
from esmfold_peft.adapters.inject import AdapterSet
from esmfold_peft.fold.run.checkpoint import load_trained_model
from esmfold_peft.fold.predict import (MergeMismatchError, file_stems, length_batches, merge_adapter_checked,
                                       predict_fasta, predict_sequences)
from fold_fixtures import load_script as load_script_named
from openfold.np import residue_constants

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "predict.py"
CPU = torch.device("cpu")


@pytest.fixture
def run_dir(tiny_lorta_run):
    return tiny_lorta_run


@pytest.fixture
def model(run_dir):
    model, _ = load_trained_model(run_dir)
    return model.eval()


def load_script():
    return load_script_named("predict")


def test_length_batches_pack_sorted_sequences_within_the_budget():
    assert length_batches([5, 3, 10, 3, 8], 16) == [[1, 3, 0], [4], [2]]
    assert length_batches([10], 4) == [[0]]  # longer than the budget: alone
    with pytest.raises(ValueError, match="positive"):
        length_batches([3], 0)


def test_file_stems_are_safe_and_unique():
    ids = ["a/b", "a_b", "A_B", ".hidden", "predictions", "x" * 150, "sp|P1|K1_HUMAN"]
    assert file_stems(ids) == ["a_b", "a_b-2", "A_B-3", "_hidden", "predictions-2", "x" * 100, "sp_P1_K1_HUMAN"]


def test_script_writes_pdbs_with_plddt_and_reports_bad_records(run_dir, tmp_path):
    good = {"alpha": "MKTAYIAKQRQISFVKSHFSRQ", "beta/2": "GSHMLEDPXKRWAC", "gamma": "acdefghiklmnpqrstvwy"}
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">alpha first\nMKTAYIAKQR\nQISFVKSHFSRQ\n>bad_gap\nMKT--A\n>beta/2\nGSHMLEDPXKRWAC\n"
                     ">gamma\nacdefghiklmnpqrstvwy\n>alpha\nMKT\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--fasta", str(fasta), "--run", str(run_dir),
                           "--out", str(out), "--max-tokens-per-batch", "40"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "wrote 3 structure(s)" in proc.stdout and str(out) in proc.stdout
    assert "adapter merged" in proc.stdout
    assert "bad_gap (line 4): invalid character" in proc.stderr
    assert "alpha (line 10): duplicate id" in proc.stderr
    # the tiny run trained pLDDT (on Cα) but not pTM: said once for the job, not per record
    assert proc.stderr.count("pTM and PAE are not written: the run's pTM head was never trained") == 1
    assert "(.pdb + .json each)" in proc.stdout

    summary = json.loads((out / "predictions.json").read_text())
    assert summary["n_predicted"] == 3 and summary["n_failed"] == 2 and summary["adapter_merged"]
    assert summary["merge_check"]["ok"] and summary["num_recycles"] == 0  # the tiny run's val.num_recycles
    assert [f["id"] for f in summary["failures"]] == ["bad_gap", "alpha"]
    assert [p["id"] for p in summary["predictions"]] == ["alpha", "beta/2", "gamma"]

    parser = PDBParser(QUIET=True)
    for record in summary["predictions"]:
        seq = good[record["id"]].upper()
        assert record["sequence"] == seq and record["length"] == len(seq)
        per_record = json.loads((out / record["pdb"].replace(".pdb", ".json")).read_text())
        assert per_record == record
        assert 0 <= record["mean_plddt"] <= 100 and record["seconds"] > 0
        assert record["ptm"] is None and record["pae"] is None  # from a pTM head never trained: no number
        structure = parser.get_structure(record["id"], out / record["pdb"])
        assert len(structure) == 1 and [c.id for c in structure[0]] == ["A"]
        residues = list(structure[0]["A"])
        assert [r.id[1] for r in residues] == list(range(1, len(seq) + 1))
        ca_plddt = []
        for residue, aa in zip(residues, seq):
            name = residue_constants.restype_1to3.get(aa, "UNK")
            assert residue.get_resname() == name
            expected = residue_constants.residue_atoms[name] if aa != "X" else ["CA"]
            assert sorted(a.get_id() for a in residue) == sorted(expected)
            assert 0 <= residue["CA"].get_bfactor() <= 100
            assert all(a.get_bfactor() == residue["CA"].get_bfactor() for a in residue)  # Cα pLDDT on every atom
            ca_plddt.append(residue["CA"].get_bfactor())
        assert np.mean(ca_plddt) == pytest.approx(record["mean_plddt"], abs=0.01)  # mean of the Cα pLDDT
        assert ca_plddt == pytest.approx(record["plddt_per_residue"], abs=0.006)
    assert (out / "beta_2.pdb").is_file() and not list(out.glob("*.pae.npz"))
    assert summary["confidence"]["plddt_head"] == "ca" and summary["ptm_head_trained"] is False
    assert summary["max_tokens_per_batch"] == 40 and summary["processes"] == 1


def test_batching_does_not_change_the_results(model):
    short = "MKTAYIAKQR"
    alone = predict_sequences(model, [short], CPU, num_recycles=1)[0]
    batch = predict_sequences(model, ["GSHMLEDPVKRWACGSHMLEDPVK", short, "ACDEFGHIKLMNPQRSTVWYAC"], CPU, num_recycles=1)
    together = batch[1]
    assert together.batch_size == 3 and together.sequence == short
    np.testing.assert_array_equal(alone.atom_mask, together.atom_mask)
    np.testing.assert_allclose(together.atom_positions, alone.atom_positions, atol=1e-4)
    np.testing.assert_allclose(together.plddt, alone.plddt, atol=1e-3)
    assert together.ptm == pytest.approx(alone.ptm, abs=1e-5)


def test_merge_check_passes_for_an_exact_merge_and_catches_a_wrong_one(model, monkeypatch):
    adapters = get_adapter_set(model.esm)
    torch.manual_seed(0)
    with torch.no_grad():  # a large adapter, so that a merge that does the wrong thing shows
        for p in adapters.get().parameters():
            p.normal_(0.0, 0.5)
    seqs = ["MKTAYIAKQRQISF", "GSHMLEDPVKRW"]
    with adapters.disabled():
        base = predict_sequences(model, seqs, CPU, num_recycles=0)
    adapted = predict_sequences(model, seqs, CPU, num_recycles=0)
    assert np.abs(base[0].atom_positions - adapted[0].atom_positions).max() > 0.1

    check, merged = merge_adapter_checked(model, seqs, CPU, num_recycles=0)
    assert check.ok and check.n_sequences == 2 and adapters.merged is not None
    assert check.max_position_deviation <= 1e-3 and check.max_plddt_deviation <= 1e-3
    np.testing.assert_allclose(merged[0].atom_positions, adapted[0].atom_positions, atol=1e-3)
    adapters.unmerge()

    real_merge = AdapterSet.merge

    def merge_twice(self):  # a broken merge: the update lands in the weights twice
        real_merge(self)
        self._fold(+1.0)

    monkeypatch.setattr(AdapterSet, "merge", merge_twice)
    with pytest.raises(MergeMismatchError, match="merging the adapter changed the outputs"):
        merge_adapter_checked(model, seqs, CPU, num_recycles=0)
    assert adapters.merged is None  # unmerged again after the failed check


def test_out_of_memory_batches_are_split_down_to_single_sequences(run_dir, tmp_path, monkeypatch):
    real = predict_module.predict_sequences

    def limited(model, sequences, device, num_recycles):
        if len(sequences) > 1 or len(sequences[0]) > 20:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, sequences, device, num_recycles)

    monkeypatch.setattr(predict_module, "predict_sequences", limited)
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nGSHMLEDPVK\n>c\nACDEFGHIK\n>long\nMKTAYIAKQRQISFVKSHFSRQLEE\n")
    run = predict_fasta(fasta, run_dir, tmp_path / "out", merge=False, progress=False)
    assert [p["id"] for p in run.predicted] == ["a", "b", "c"]
    assert all(p["batch_size"] == 1 for p in run.predicted)
    assert [(f.id, f.reason) for f in run.failures] == [("long", "out of memory on cpu for 25 residues")]


def test_checkpoint_without_merge_matches_the_exported_model(run_dir, tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">p\nMKTAYIAKQRQISFVK\n")
    script = load_script()
    assert script.main(["--fasta", str(fasta), "--run", str(run_dir), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert script.main(["--fasta", str(fasta), "--run", str(run_dir), "--out", str(tmp_path / "b"), "--quiet",
                        "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--no-merge",
                        "--num-recycles", "1"]) == 0
    b = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert not b["adapter_merged"] and b["merge_check"] is None and b["num_recycles"] == 1
    assert b["checkpoint"].endswith("last.pt")
    assert script.main(["--fasta", str(fasta), "--run", str(run_dir), "--out", str(tmp_path / "c"), "--quiet",
                        "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--no-merge"]) == 0
    parser = PDBParser(QUIET=True)
    coords = [np.array([a.coord for a in parser.get_structure(d, tmp_path / d / "p.pdb").get_atoms()])
              for d in ("a", "c")]
    np.testing.assert_allclose(coords[0], coords[1], atol=2e-3)  # PDB keeps 3 decimals
    assert "wrote 1 structure(s)" in capsys.readouterr().out


def test_unusable_inputs_are_usage_errors(run_dir, tmp_path, capsys):
    script = load_script()
    missing = tmp_path / "missing.fasta"
    assert script.main(["--fasta", str(missing), "--run", str(run_dir), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"error: {missing}: file not found" in capsys.readouterr().err
    not_fasta = tmp_path / "model.pdb"
    not_fasta.write_text("ATOM      1  N   MET A   1\n")
    assert script.main(["--fasta", str(not_fasta), "--run", str(run_dir), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"{not_fasta}: not FASTA" in capsys.readouterr().err
    fasta = tmp_path / "ok.fasta"
    fasta.write_text(">p\nMKT\n")
    assert script.main(["--fasta", str(fasta), "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--fasta", str(fasta), "--run", str(run_dir), "--out", str(tmp_path / "o"),
                     "--max-tokens-per-batch", "0"])
    assert exit_info.value.code == 2
