"""Prediction as esm-fold users expect it: multimers (A:B), per-atom pLDDT, PAE, --chunk-size, --esmfold, flags."""

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from Bio.PDB import PDBParser

from esm.esmfold.v1.misc import batch_encode_sequences
from esmfold_peft.fold.run.checkpoint import load_trained_model
from esmfold_peft.fold.predict import (CA_ONLY, CHAIN_LINKER, PER_ATOM, encode_sequences, model_length,
                                       predict_fasta, predict_sequences, shard_records)
from fold_fixtures import load_script as load_script_named
from openfold.np import residue_constants
from openfold.utils.loss import compute_tm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "predict.py"
CPU = torch.device("cpu")
CHAIN_A, CHAIN_B = "MKTAYIAKQRQISFVK", "DPWERSHLNVEM"  # no G, so a written linker would show


@pytest.fixture
def run_dir(tiny_lorta_run):
    return tiny_lorta_run


@pytest.fixture
def model(run_dir):
    model, _ = load_trained_model(run_dir)
    return model.eval()


def load_script():
    return load_script_named("predict")


def pdb_atoms(path):
    """(chain, residue number, residue name, atom name) -> (coordinates, B-factor) of every atom."""
    structure = PDBParser(QUIET=True).get_structure("p", path)
    return {(a.get_parent().get_parent().id, a.get_parent().id[1], a.get_parent().get_resname(), a.get_id()):
            (a.coord.copy(), a.get_bfactor()) for a in structure.get_atoms()}


def test_multimer_encoding_is_esm_folds():
    seqs = [f"{CHAIN_A}:{CHAIN_B}:ACX", "MKTAYIAKQR", "A:C"]
    ours = encode_sequences(seqs)
    aatype, mask, residx, linker_mask, _ = batch_encode_sequences(seqs)
    real = mask.bool()
    assert torch.equal(ours["aatype"], aatype) and torch.equal(ours["mask"], mask.float())
    assert torch.equal(ours["residue_index"][real], residx[real])
    assert torch.equal(ours["linker_mask"][real], linker_mask[real])
    assert model_length(seqs[0]) == len(CHAIN_A) + len(CHAIN_B) + 3 + 2 * len(CHAIN_LINKER) == int(mask[0].sum())
    chain_index = ours["chain_index"][0]
    assert chain_index[:len(CHAIN_A)].eq(0).all() and chain_index[len(CHAIN_A):len(CHAIN_A) + 25].eq(-1).all()
    assert ours["residue_index"][0, len(CHAIN_A) + 25] == len(CHAIN_A) + 25 + 512  # chain B starts 512 further on


def test_shards_are_balanced_and_cover_every_record_once():
    lengths = [5, 50, 7, 40, 30, 8, 9, 60]
    shards = shard_records(lengths, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    # longest first, dealt 0 1 2 2 1 0 0 1: 60 50 40 | 30 9 8 | 7 5
    assert shards == [[2, 5, 7], [0, 1, 6], [3, 4]]
    totals = [sum(lengths[i] for i in s) for s in shards]
    assert max(totals) - min(totals) <= max(lengths) // 2
    assert shard_records(lengths, 1) == [list(range(len(lengths)))]
    assert shard_records([3], 4) == [[0], [], [], []]


def test_multimer_pdb_chains_numbering_and_linker_free_ptm_and_pae(model, run_dir, tmp_path):
    """The tiny run never trained its pTM head: its files hold no pTM or PAE (test_predict_confidence.py has a run
    whose files do); the predictions in memory are checked here."""
    seq = f"{CHAIN_A}:{CHAIN_B}"
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">dimer two chains\n{CHAIN_A}:\n{CHAIN_B}\n>mono\n{CHAIN_A}\n")
    run = predict_fasta(fasta, run_dir, tmp_path / "out", merge=False, progress=False, num_recycles=0)
    assert run.ok and [p["id"] for p in run.predicted] == ["dimer", "mono"]
    record = run.predicted[0]
    assert record["sequence"] == seq and record["n_chains"] == 2
    assert record["chain_lengths"] == [len(CHAIN_A), len(CHAIN_B)] and record["length"] == len(CHAIN_A) + len(CHAIN_B)
    assert json.loads((tmp_path / "out" / "dimer.json").read_text()) == record

    # PDB: chains A and B, each numbered from 1, their own residues only (no poly-G linker)
    structure = PDBParser(QUIET=True).get_structure("d", tmp_path / "out" / "dimer.pdb")
    chains = {c.id: list(c) for c in structure[0]}
    assert list(chains) == ["A", "B"]
    for chain_id, chain_seq in (("A", CHAIN_A), ("B", CHAIN_B)):
        residues = chains[chain_id]
        assert [r.id[1] for r in residues] == list(range(1, len(chain_seq) + 1))
        assert [r.get_resname() for r in residues] == [residue_constants.restype_1to3[a] for a in chain_seq]
    assert "GLY" not in {r.get_resname() for rs in chains.values() for r in rs}

    # the same sequence predicted directly: pTM is openfold's compute_tm with the linker weighted 0
    pred = predict_sequences(model, [seq], CPU, num_recycles=0)[0]
    enc = encode_sequences([seq])
    with torch.no_grad():
        out = model(enc["aatype"], enc["mask"], enc["residue_index"], num_recycles=0)
    logits = out["ptm_logits"][0]
    weights = enc["linker_mask"][0]
    assert weights.sum() == len(CHAIN_A) + len(CHAIN_B) and weights.numel() == logits.shape[0]
    without_linker = float(compute_tm(logits, residue_weights=weights, max_bin=31, no_bins=64))
    with_linker = float(compute_tm(logits, max_bin=31, no_bins=64))
    assert with_linker == pytest.approx(float(out["ptm"][0]), abs=1e-6)  # the model's own pTM keeps the linker
    assert pred.ptm == pytest.approx(without_linker, abs=1e-6)
    assert abs(with_linker - without_linker) > 1e-4  # the masking is applied and matters
    keep = weights.bool()
    sub = float(compute_tm(logits[keep][:, keep], max_bin=31, no_bins=64))
    assert pred.ptm == pytest.approx(sub, abs=1e-6)  # = the pTM of the chains alone
    assert record["ptm"] is None and record["pae"] is None  # not written: the run's pTM head never trained
    assert not (tmp_path / "out" / "dimer.pae.npz").exists()

    # PAE: L x L without the linker's rows and columns, and the file's layout
    n = len(CHAIN_A) + len(CHAIN_B)
    expected = out["predicted_aligned_error"][0][keep][:, keep].numpy()
    np.testing.assert_allclose(pred.pae, expected, atol=1e-5)
    npz = np.load(io.BytesIO(pred.pae_npz()))
    assert npz["pae"].shape == (n, n) and npz["chain_index"].tolist() == [0] * len(CHAIN_A) + [1] * len(CHAIN_B)
    np.testing.assert_allclose(npz["pae"].astype(np.float32), expected, atol=0.02)
    assert float(npz["max_predicted_aligned_error"]) == pytest.approx(float(out["max_predicted_aligned_error"]),
                                                                      abs=1e-4)

    # a monomer's pTM is the model's pTM
    mono = predict_sequences(model, [CHAIN_A], CPU, num_recycles=0)[0]
    with torch.no_grad():
        mono_out = model(*(encode_sequences([CHAIN_A])[k] for k in ("aatype", "mask", "residue_index")),
                         num_recycles=0)
    assert mono.ptm == pytest.approx(float(mono_out["ptm"][0]), abs=1e-6)


def test_b_factors_are_the_per_atom_plddt_for_a_per_atom_head(model, tmp_path):
    """PER_ATOM, the convention of fair-esm's ESMFold (the tiny run's own head is trained on Cα: that convention,
    and the end-to-end choice between them, are tested below and in test_predict_confidence.py)."""
    seq = "MKTAYIAKQRXWFDE:HLNVC"
    pred = predict_sequences(model, [seq], CPU, num_recycles=0)[0]
    path = tmp_path / "p.pdb"
    path.write_text(pred.to_pdb(PER_ATOM))
    atoms = pdb_atoms(path)
    varying = 0
    residue_at = {}
    for i, (c, num) in enumerate(zip(pred.chain_index, pred.residue_numbers)):
        residue_at["AB"[c], int(num)] = i
    by_residue: dict = {}
    for (chain, num, _, name), (_, b) in atoms.items():
        i = residue_at[chain, num]
        assert b == pytest.approx(float(pred.atom_plddt[i, residue_constants.atom_order[name]]), abs=0.006)
        by_residue.setdefault(i, []).append(b)
    for i, bs in by_residue.items():
        written = pred.atom_mask[i] > 0
        if np.ptp(pred.atom_plddt[i][written]) > 0.05:  # the model's per-atom pLDDT differs within the residue
            varying += 1
            assert np.ptp(bs) > 0.02  # and so do the B-factors
    assert varying > 0
    assert len(by_residue) == len(seq) - 1  # every residue written, no linker
    assert pred.mean_plddt == pytest.approx(float(pred.atom_plddt[:, 1].mean()))  # Cα mean


def test_b_factors_are_the_ca_plddt_for_a_ca_head_and_zero_for_an_untrained_one(model, tmp_path):
    pred = predict_sequences(model, ["MKTAYIAKQRXWFDE:HLNVC"], CPU, num_recycles=0)[0]
    residue_at = {("AB"[c], int(num)): i for i, (c, num) in enumerate(zip(pred.chain_index, pred.residue_numbers))}
    (tmp_path / "ca.pdb").write_text(pred.to_pdb(CA_ONLY, remark="p"))
    for (chain, num, _, _), (_, b) in pdb_atoms(tmp_path / "ca.pdb").items():
        assert b == pytest.approx(float(pred.plddt[residue_at[chain, num]]), abs=0.006)
    (tmp_path / "none.pdb").write_text(pred.to_pdb(None))
    assert {b for _, b in pdb_atoms(tmp_path / "none.pdb").values()} == {0.0}
    head = (tmp_path / "ca.pdb").read_text().splitlines()[:3]
    assert head == ["REMARK p", "REMARK B-factors: per-residue CA pLDDT (0-100) on every atom of the residue",
                    "REMARK (the model's pLDDT head was trained on CA only)"]


def test_chunk_size_gives_the_same_structure(run_dir, tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">p\n{CHAIN_A}{CHAIN_B}\n>d\n{CHAIN_A}:{CHAIN_B}\n")
    script = load_script()
    base = ["--fasta", str(fasta), "--run", str(run_dir), "--quiet", "--no-merge", "--num-recycles", "1"]
    assert script.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert script.main(base + ["--out", str(tmp_path / "chunked"), "--chunk-size", "4"]) == 0
    plain = json.loads((tmp_path / "plain" / "predictions.json").read_text())
    chunked = json.loads((tmp_path / "chunked" / "predictions.json").read_text())
    assert plain["chunk_size"] is None and chunked["chunk_size"] == 4
    for stem in ("p", "d"):
        a, b = pdb_atoms(tmp_path / "plain" / f"{stem}.pdb"), pdb_atoms(tmp_path / "chunked" / f"{stem}.pdb")
        assert a.keys() == b.keys()
        np.testing.assert_allclose(np.array([v[0] for v in a.values()]), np.array([b[k][0] for k in a]), atol=2e-3)
        np.testing.assert_allclose([v[1] for v in a.values()], [b[k][1] for k in a], atol=0.02)


def test_chunked_trunk_matches_unchunked_in_the_model(model):
    seq = f"{CHAIN_A}{CHAIN_B}"
    plain = predict_sequences(model, [seq], CPU, num_recycles=1)[0]
    model.trunk.set_chunk_size(3)
    try:
        chunked = predict_sequences(model, [seq], CPU, num_recycles=1)[0]
    finally:
        model.trunk.set_chunk_size(None)
    np.testing.assert_allclose(chunked.atom_positions, plain.atom_positions, atol=1e-3)
    np.testing.assert_allclose(chunked.atom_plddt, plain.atom_plddt, atol=1e-3)
    np.testing.assert_allclose(chunked.pae, plain.pae, atol=1e-3)


def test_help_lists_the_esm_fold_flags(capsys):
    script = load_script()
    with pytest.raises(SystemExit) as info:
        script.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--max-tokens-per-batch", "--chunk-size", "--num-recycles", "--esmfold", "--lm", "--run",
                 "--max-length", "A:B"):
        assert flag in text, flag
    assert "--batch-residues" not in text  # the old name still parses, unlisted
    args = script.build_parser().parse_args(["--fasta", "f", "--run", "r", "--out", "o", "--batch-residues", "64"])
    assert args.max_tokens_per_batch == 64
    args = script.build_parser().parse_args(["--fasta", "f", "--run", "r", "--out", "o"])
    assert args.max_tokens_per_batch == 1024 and args.chunk_size is None


@pytest.mark.parametrize("extra, message", [
    (["--run", "R", "--esmfold", "E"], "not allowed with argument"),
    (["--esmfold", "E", "--checkpoint", "C"], "--checkpoint and --set"),
    (["--esmfold", "E", "--set", "a=1"], "--checkpoint and --set"),
    (["--run", "R", "--lm", "L"], "--lm goes with --esmfold"),
    ([], "one of the arguments --run/--run-dir --esmfold is required"),
    (["--run", "R", "--chunk-size", "0"], "must be at least 1"),
])
def test_model_source_flags_are_checked(extra, message, capsys, tmp_path):
    script = load_script()
    with pytest.raises(SystemExit) as info:
        script.main(["--fasta", str(tmp_path / "f.fasta"), "--out", str(tmp_path / "o")] + extra)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_esmfold_checkpoint_is_loaded_through_the_pretrained_loader(run_dir, tmp_path, monkeypatch, capsys):
    """--esmfold CKPT --lm LM: load_esmfold_checkpoint(path, lm=…, device=…) -> (model, cfg), here faked."""
    calls = []

    def load_esmfold_checkpoint(path, lm=None, device="cpu"):
        calls.append((path, lm, device))
        model, cfg = load_trained_model(run_dir)
        return model, cfg

    fake = types.ModuleType("esmfold_peft.fold.run.esmfold_read")
    fake.load_esmfold_checkpoint = load_esmfold_checkpoint
    monkeypatch.setitem(sys.modules, "esmfold_peft.fold.run.esmfold_read", fake)
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">d\n{CHAIN_A}:{CHAIN_B}\n")
    script = load_script()
    assert script.main(["--fasta", str(fasta), "--esmfold", str(tmp_path / "esmfold_3B_v1.pt"), "--lm",
                        str(tmp_path / "esm2.pt"), "--out", str(tmp_path / "o"), "--quiet", "--no-merge",
                        "--device", "cpu"]) == 0
    assert calls == [(tmp_path / "esmfold_3B_v1.pt", str(tmp_path / "esm2.pt"), "cpu")]
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["esmfold"].endswith("esmfold_3B_v1.pt") and summary["lm"].endswith("esm2.pt")
    assert summary["run_dir"] is None and summary["adapter"] == "none"
    max_recycles = load_trained_model(run_dir)[0].trunk.cfg.max_recycles
    assert summary["num_recycles"] == max_recycles - 1  # esm-fold's default: max_recycles trunk passes
    assert summary["predictions"][0]["n_chains"] == 2
    # a fair-esm file's heads: pLDDT per atom, pTM trained (ipTM, each chain's pTM, the PAE file)
    assert summary["confidence"]["plddt_head"] == "per_atom" and summary["ptm_head_trained"] is True
    record = summary["predictions"][0]
    assert 0 < record["iptm"] <= 1 and len(record["ptm_per_chain"]) == 2 and (tmp_path / "o" / record["pae"]).is_file()
    assert "wrote 1 structure(s) (.pdb + .pae.npz + .pae.json + .json each)" in capsys.readouterr().out


# --- a tiny fair-esm ESMFold checkpoint: our predictions against fair-esm's own esm-fold path ----

def _write_fair_esm_files(tmp_path, monkeypatch):
    """(ESMFold checkpoint, ESM-2 .pt, fair-esm's own ESMFold from the checkpoint), all tiny and random."""
    import argparse
    import dataclasses

    import esm
    from esm.esmfold.v1 import esmfold as fair_esmfold
    from esm.esmfold.v1.trunk import FoldingTrunkConfig, StructureModuleConfig
    from omegaconf import OmegaConf

    from esmfold_peft.fold.model.lm import load_fair_esm_checkpoint

    torch.manual_seed(0)
    lm = esm.model.esm2.ESM2(num_layers=2, embed_dim=64, attention_heads=4)
    lm_file = tmp_path / "tiny_esm2.pt"  # float16-exact, as fair-esm halves its LM
    torch.save({"cfg": {"model": argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4,
                                                    token_dropout=True)},
                "model": {f"encoder.sentence_encoder.{k}": v.half().float() if v.is_floating_point() else v
                          for k, v in lm.state_dict().items() if not k.startswith("contact_head.regression")}},
               lm_file)
    fake = lambda *args: load_fair_esm_checkpoint(lm_file)  # noqa: E731
    monkeypatch.setattr(esm.pretrained, "esm2_t36_3B_UR50D", fake)
    for key in list(getattr(fair_esmfold, "esm_registry", {})):
        monkeypatch.setitem(fair_esmfold.esm_registry, key, fake)
    sm = StructureModuleConfig(c_s=16, c_z=8, c_ipa=8, c_resnet=8, no_heads_ipa=2, no_qk_points=2, no_v_points=3,
                               no_blocks=2)
    trunk = FoldingTrunkConfig(num_blocks=1, sequence_state_dim=32, pairwise_state_dim=16, sequence_head_width=16,
                               pairwise_head_width=8, max_recycles=2, structure_module=sm)
    cfg = OmegaConf.create({"model": {"esm_type": "esm2_3B", "fp16_esm": True, "use_esm_attn_map": False,
                                      "trunk": dataclasses.asdict(trunk), "embed_aa": True, "bypass_lm": False,
                                      "lddt_head_hid_dim": 16}})
    torch.manual_seed(1)
    fair = fair_esmfold.ESMFold(esmfold_config=cfg.model)
    with torch.no_grad():  # openfold zero-initialises its final layers: make every tensor matter
        for name, p in fair.named_parameters():
            if not name.startswith("esm."):
                p.add_(0.1 * torch.randn_like(p))
    ckpt = tmp_path / "esmfold_tiny.pt"
    torch.save({"cfg": cfg, "model": {k: v for k, v in fair.state_dict().items() if not k.startswith("esm.")}}, ckpt)
    fair.esm.float()  # as esm-fold --cpu-only runs it
    return ckpt, lm_file, fair.eval()


@pytest.mark.filterwarnings("ignore:Regression weights not found")
def test_esmfold_checkpoint_predicts_what_esm_fold_predicts_with_better_numbering(tmp_path, monkeypatch):
    pretrained = pytest.importorskip("esmfold_peft.fold.run.esmfold_read")
    if not hasattr(pretrained, "load_esmfold_checkpoint"):
        pytest.skip("no ESMFold checkpoint loader")
    ckpt, lm_file, fair = _write_fair_esm_files(tmp_path, monkeypatch)
    seq = f"{CHAIN_A}:{CHAIN_B}"
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">d\n{seq}\n>m\n{CHAIN_A}\n")
    script = load_script()
    assert script.main(["--fasta", str(fasta), "--esmfold", str(ckpt), "--lm", str(lm_file), "--out",
                        str(tmp_path / "o"), "--quiet", "--device", "cpu"]) == 0
    with torch.no_grad():  # both with their default recycles (fair-esm: None, the trunk's max_recycles passes)
        theirs_pdb = fair.infer_pdbs([seq])[0]
        theirs_mono = fair.infer_pdbs([CHAIN_A])[0]
    (tmp_path / "theirs.pdb").write_text(theirs_pdb)
    (tmp_path / "theirs_mono.pdb").write_text(theirs_mono)
    ours, theirs = pdb_atoms(tmp_path / "o" / "d.pdb"), pdb_atoms(tmp_path / "theirs.pdb")
    # esm-fold numbers chain B on from chain A through the linker and the 512 offset; we start it at 1
    shift = {"A": 0, "B": len(CHAIN_A) + len(CHAIN_LINKER) + 512}
    renumbered = {(c, n - shift[c], r, a): v for (c, n, r, a), v in theirs.items()}
    assert renumbered.keys() == ours.keys()  # the same atoms; neither writes the linker
    for key, (xyz, b) in ours.items():
        np.testing.assert_allclose(xyz, renumbered[key][0], atol=2e-3, err_msg=str(key))
        assert b == pytest.approx(renumbered[key][1], abs=0.011), key  # per-atom pLDDT, as esm-fold writes it
    mono, mono_theirs = pdb_atoms(tmp_path / "o" / "m.pdb"), pdb_atoms(tmp_path / "theirs_mono.pdb")
    assert mono.keys() == mono_theirs.keys()
    for key, (xyz, b) in mono.items():
        np.testing.assert_allclose(xyz, mono_theirs[key][0], atol=2e-3)
        assert b == pytest.approx(mono_theirs[key][1], abs=0.011)
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["esmfold"] == str(ckpt) and summary["num_recycles"] == 1 and summary["adapter"] == "none"
    assert summary["confidence"]["plddt_head"] == "per_atom"
    assert "REMARK B-factors: per-atom pLDDT" in (tmp_path / "o" / "d.pdb").read_text()
    with torch.no_grad():
        their_mono_out = fair.infer([CHAIN_A])
    assert summary["predictions"][1]["ptm"] == pytest.approx(float(their_mono_out["ptm"][0]), abs=1e-5)
