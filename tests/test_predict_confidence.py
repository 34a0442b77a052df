"""What the confidence numbers written by prediction mean: pLDDT per atom / on Cα / never trained, pTM and PAE only from
a trained head, each chain's pTM and the interface pTM (ipTM)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from Bio.PDB import PDBParser

import esmfold_peft.fold.predict.job as job_module
from esmfold_peft.fold.predict import (CA_ONLY, PAE_SUFFIX, PER_ATOM, ConfidenceHeads, chain_ptms, confidence_heads,
                                       encode_sequences, head_trained_in_run, interface_ptm, predict_fasta)
from esmfold_peft.fold.run.checkpoint import load_trained_model
from esmfold_peft.fold.run.config import PARTS, base_config
from esmfold_peft.runtime.errors import EXIT_OK
from fold_fixtures import tiny_run_config, write_esmfold_checkpoint
from openfold.np import residue_constants
from openfold.utils.loss import compute_tm

CHAIN_A, CHAIN_B = "MKTAYIAKQRQISFVK", "DPWERSHLNVEM"
BIG = 1e4  # a logit that takes all of the softmax's mass (exp(-1e4) is 0 in float32)
NEAR, FAR = 0, 63  # the first and the last of the pTM head's 64 bins: centres 0.25 Å and 31.75 Å


def tm_term(centre: float, n: int) -> float:
    """AF2's TM term of an error `centre` for n residues (d0 from n clipped at 19), by hand."""
    d0 = 1.24 * (max(n, 19) - 15) ** (1 / 3) - 1.8
    return 1 / (1 + (centre / d0) ** 2)


def one_bin_logits(bins: np.ndarray) -> torch.Tensor:
    """[L, L, 64] logits that put all mass of pair (i, j) in bin bins[i, j]."""
    logits = torch.zeros(*bins.shape, 64)
    logits.scatter_(-1, torch.as_tensor(bins, dtype=torch.long)[..., None], BIG)
    return logits


def pdb_residues(path: Path) -> list:
    return list(PDBParser(QUIET=True).get_structure("p", path).get_residues())


def remarks(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("REMARK"))


def fasta_file(tmp_path: Path) -> Path:
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">mono\n{CHAIN_A}\n>dimer\n{CHAIN_A}:{CHAIN_B}\n")
    return fasta


# --- ipTM and each chain's pTM on logits whose answer is known ---------------------------------------

def test_interface_ptm_averages_the_other_chains_terms_and_takes_the_best_residue():
    # chain A: 0, 1, 2; a linker (left out): 3, 4; chain B: 5, 6. Intra-chain and linker pairs are "near"
    # (they must not count), inter-chain pairs "far" except (1, 5).
    chain_index = torch.tensor([0, 0, 0, -1, -1, 1, 1])
    same = chain_index[:, None] == chain_index[None, :]
    linker = (chain_index[:, None] < 0) | (chain_index[None, :] < 0)
    bins = np.where((same | linker).numpy(), NEAR, FAR)
    bins[1, 5] = NEAR
    t0, t_far = tm_term(0.25, 5), tm_term(31.75, 5)  # 5 residues: d0 of 19
    assert interface_ptm(one_bin_logits(bins), chain_index) == pytest.approx((t0 + t_far) / 2, rel=1e-5)


def test_interface_ptm_takes_d0_from_the_whole_complex_and_chain_ptm_from_each_chain():
    # chain A: 20 residues, all pairs near; chain B: 10, all far; between them far except (0, 20)
    chain_index = torch.tensor([0] * 20 + [1] * 10)
    bins = np.full((30, 30), FAR)
    bins[:20, :20] = NEAR
    bins[0, 20] = NEAR
    logits = one_bin_logits(bins)
    expected = (tm_term(0.25, 30) + 9 * tm_term(31.75, 30)) / 10  # residue 0 against B's 10 residues
    assert interface_ptm(logits, chain_index) == pytest.approx(expected, rel=1e-5)
    ptm_a, ptm_b = chain_ptms(logits, chain_index)
    assert ptm_a == pytest.approx(tm_term(0.25, 20), rel=1e-5)  # d0 from chain A's 20 residues
    assert ptm_b == pytest.approx(tm_term(31.75, 10), rel=1e-5)
    assert ptm_b == pytest.approx(float(compute_tm(logits[20:, 20:], max_bin=31, no_bins=64)), rel=1e-6)


def test_interface_ptm_of_a_monomer_is_none_and_of_non_finite_logits_nan():
    logits = torch.randn(6, 6, 64)
    assert interface_ptm(logits, torch.zeros(6, dtype=torch.long)) is None
    assert interface_ptm(logits, torch.tensor([0, 0, 0, -1, -1, -1])) is None  # a linker is no second chain
    logits[0, 3, 5] = float("nan")
    assert np.isnan(interface_ptm(logits, torch.tensor([0, 0, 0, 1, 1, 1])))


# --- which convention applies: decided from the run's config alone ------------------------------------

def config(trainable="embeddings,trunk,structure_module,heads", plddt=0.01, tm=0.0, init_from=""):
    cfg = base_config()
    cfg.model.trainable, cfg.model.init_from = trainable, init_from
    cfg.loss.plddt.weight, cfg.loss.tm.weight = plddt, tm
    return cfg


@pytest.mark.parametrize("kwargs, plddt, ptm, why_not", [
    ({}, CA_ONLY, False, "loss.tm.weight 0"),  # a run trained from scratch, the defaults
    ({"tm": 0.1}, CA_ONLY, True, None),
    ({"plddt": 0.0, "tm": 0.1}, None, True, "loss.plddt.weight 0"),
    ({"trainable": "embeddings,trunk", "tm": 0.1}, None, False, "model.trainable"),
    ({"trainable": "", "init_from": "esmfold_3B_v1.pt"}, PER_ATOM, True, None),  # adapters on a pretrained ESMFold
    ({"init_from": "esmfold_3B_v1.pt"}, CA_ONLY, True, None),  # its lDDT head retrained here, its pTM head kept
    ({"init_from": "esmfold_3B_v1.pt", "plddt": 0.0}, PER_ATOM, True, None),
])
def test_confidence_heads_follow_the_runs_losses_trainable_parts_and_pretrained_base(kwargs, plddt, ptm, why_not):
    heads = confidence_heads(config(**kwargs))
    assert heads.plddt == plddt and heads.ptm is ptm
    assert head_trained_in_run(config(**kwargs), "lddt_head") is (plddt == CA_ONLY)
    messages = heads.warnings()
    assert len(messages) == (plddt is None) + (not ptm)
    if why_not:
        assert any(why_not in m for m in messages), messages


@pytest.mark.skipif("confidence" not in PARTS, reason="model.trainable has no 'confidence' part here")
def test_the_confidence_part_trains_both_heads():
    cfg = config(trainable="confidence", init_from="esmfold_3B_v1.pt", tm=0.1)
    assert head_trained_in_run(cfg, "lddt_head") and head_trained_in_run(cfg, "ptm_head")
    assert confidence_heads(cfg).plddt == CA_ONLY


def test_a_fair_esm_checkpoint_is_per_atom_with_a_trained_ptm_head():
    heads = confidence_heads(esmfold=True)
    assert heads.plddt == PER_ATOM and heads.ptm and heads.warnings() == []
    assert heads.as_dict()["plddt_head"] == "per_atom" and heads.as_dict()["ptm_head_trained"] is True
    with pytest.raises(ValueError):
        ConfidenceHeads("per_residue", True, "", "")


# --- written files: a run that trained pLDDT on Cα and never trained pTM (the shared tiny run) ---------

def test_untrained_ptm_head_gives_no_ptm_no_pae_and_one_warning(tiny_lorta_run, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"dimer{PAE_SUFFIX}").write_bytes(b"left by an earlier job")
    with caplog.at_level(logging.WARNING):  # one record per batch: the warning is still said once
        run = predict_fasta(fasta_file(tmp_path), tiny_lorta_run, out, merge=False, progress=False,
                            max_tokens_per_batch=1)
    assert run.ok and len(run.predicted) == 2
    said = [r.getMessage() for r in caplog.records if "pTM and PAE are not written" in r.getMessage()]
    assert said == ["pTM and PAE are not written: the run's pTM head was never trained (loss.tm.weight 0)"]
    for record in run.predicted:
        assert record["ptm"] is None and record["iptm"] is None and record["ptm_per_chain"] is None
        assert record["pae"] is None and record["max_predicted_aligned_error"] is None
        assert json.loads((out / f"{record['id']}.json").read_text()) == record
    assert not list(out.glob(f"*{PAE_SUFFIX}"))  # none written, and the stale one removed
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["ptm_head_trained"] is False and summary["confidence"]["ptm_head_trained"] is False
    assert summary["confidence"]["plddt_head"] == "ca" and "plddt" not in summary
    assert "never trained" in summary["confidence"]["reason_ptm"] and "not written" in summary["pae"]


def test_ca_trained_plddt_head_writes_the_ca_plddt_on_every_atom(tiny_lorta_run, tmp_path):
    run = predict_fasta(fasta_file(tmp_path), tiny_lorta_run, tmp_path / "out", merge=False, progress=False)
    for record in run.predicted:
        path = tmp_path / "out" / record["pdb"]
        assert "per-residue CA pLDDT (0-100) on every atom" in remarks(path)
        assert "trained on CA only" in remarks(path)
        residues = pdb_residues(path)
        assert len(residues) == record["length"] == len(record["plddt_per_residue"])
        for residue, plddt in zip(residues, record["plddt_per_residue"]):
            ca = residue["CA"].get_bfactor()
            assert all(a.get_bfactor() == ca for a in residue)  # every atom carries the residue's Cα pLDDT
            assert ca == pytest.approx(plddt, abs=0.006)
        assert record["mean_plddt"] == pytest.approx(np.mean(record["plddt_per_residue"]), abs=0.006)
    summary = json.loads(run.summary_path.read_text())
    assert summary["confidence"]["plddt_head"] == "ca" and "Cα pLDDT" in summary["confidence"]["b_factors"]
    assert "mean over residues of the Cα pLDDT" in summary["confidence"]["mean_plddt"]


def test_untrained_plddt_head_writes_zero_b_factors_and_null_plddt(tiny_lorta_run, tmp_path, caplog, monkeypatch):
    """A run that never trained its lDDT head (loss.plddt.weight 0, no pretrained base): here the tiny run said to
    be one, the decision itself being tested above on configs."""
    heads = ConfidenceHeads(None, False, "the run's pLDDT head was never trained (loss.plddt.weight 0)",
                            "the run's pTM head was never trained (loss.tm.weight 0)")
    monkeypatch.setattr(job_module, "model_heads", lambda model, cfg=None: heads)
    with caplog.at_level(logging.WARNING):
        run = predict_fasta(fasta_file(tmp_path), tiny_lorta_run, tmp_path / "out", merge=False, progress=False,
                            max_tokens_per_batch=1)
    assert sum("pLDDT is not written" in r.getMessage() for r in caplog.records) == 1
    for record in run.predicted:
        assert record["mean_plddt"] is None and record["plddt_per_residue"] is None
        path = tmp_path / "out" / record["pdb"]
        assert all(a.get_bfactor() == 0.0 for r in pdb_residues(path) for a in r)
        assert "pLDDT head was never trained" in remarks(path)
    assert json.loads(run.summary_path.read_text())["confidence"]["plddt_head"] is None


# --- a run fine-tuned from a pretrained ESMFold with its heads frozen: per-atom pLDDT, pTM, ipTM, PAE ---

@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """Adapters only (2 steps) on a tiny ESMFold file: its lDDT and pTM heads are the file's."""
    from esmfold_peft.fold.train import train

    tmp = tmp_path_factory.mktemp("finetuned")
    cfg = tiny_run_config(tmp, adapter="lorta", steps=2)
    cfg.model.trainable = ""
    cfg.model.init_from = str(write_esmfold_checkpoint(cfg, tmp / "esmfold_tiny.pt"))
    assert train(cfg, tmp / "run", progress=False) == EXIT_OK
    return tmp / "run"


def test_pretrained_heads_give_per_atom_b_factors_and_ptm_iptm_pae(finetuned_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = predict_fasta(fasta_file(tmp_path), finetuned_run, tmp_path / "out", merge=False, progress=False,
                            num_recycles=0)
    assert not [r for r in caplog.records if "not written" in r.getMessage()]
    assert run.confidence.plddt == PER_ATOM and run.confidence.ptm
    mono, dimer = run.predicted
    model, _ = load_trained_model(finetuned_run)
    seq = f"{CHAIN_A}:{CHAIN_B}"
    enc = encode_sequences([seq])
    with torch.no_grad():
        out = model.eval()(enc["aatype"], enc["mask"], enc["residue_index"], num_recycles=0)
    keep = enc["linker_mask"][0].bool()

    # B-factors: each atom's own channel of the lDDT head, differing within residues
    plddt = out["plddt"][0][keep].numpy()
    path = tmp_path / "out" / dimer["pdb"]
    assert "per-atom pLDDT (0-100)" in remarks(path)
    varying = 0
    for i, residue in enumerate(pdb_residues(path)):
        bs = [a.get_bfactor() for a in residue]
        for atom, b in zip(residue, bs):
            assert b == pytest.approx(float(plddt[i, residue_constants.atom_order[atom.get_id()]]), abs=0.006)
        varying += np.ptp(bs) > 0.02
    assert varying > 0
    assert dimer["plddt_per_residue"] == pytest.approx(plddt[:, 1].tolist(), abs=0.006)

    # pTM of each chain alone, and the interface pTM, from the model's own logits
    logits, n_a = out["ptm_logits"][0][keep][:, keep], len(CHAIN_A)
    assert dimer["ptm_per_chain"] == pytest.approx(
        [float(compute_tm(logits[:n_a, :n_a], max_bin=31, no_bins=64)),
         float(compute_tm(logits[n_a:, n_a:], max_bin=31, no_bins=64))], abs=1e-5)
    probs = torch.softmax(logits, -1).double().numpy()  # ipTM again, in plain numpy
    centres = np.append(np.linspace(0, 31, 63) + 0.25, 31.75)
    term = (probs * tm_term(centres, n_a + len(CHAIN_B))).sum(-1)
    chain = np.array([0] * n_a + [1] * len(CHAIN_B))
    best = max(term[i, chain != chain[i]].mean() for i in range(len(chain)))
    assert dimer["iptm"] == pytest.approx(best, abs=1e-5)
    assert 0 < dimer["iptm"] <= 1 and 0 < dimer["ptm"] <= 1
    assert mono["iptm"] is None and mono["ptm_per_chain"] == pytest.approx([mono["ptm"]], abs=1e-6)

    # the PAE file is written, as before
    pae = np.load(tmp_path / "out" / dimer["pae"])["pae"]
    assert pae.shape == (len(chain), len(chain)) and dimer["max_predicted_aligned_error"] > 0
    pae_json = json.loads((tmp_path / "out" / dimer["pae_json"]).read_text())  # AlphaFold DB's format
    np.testing.assert_allclose(pae_json[0]["predicted_aligned_error"], pae.astype(np.float64), atol=0.02)
    summary = json.loads(run.summary_path.read_text())
    assert summary["confidence"]["plddt_head"] == "per_atom" and summary["ptm_head_trained"] is True
    assert "model.init_from" in summary["confidence"]["reason_plddt"]
