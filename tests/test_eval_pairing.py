"""Chain and residue pairing, and per-chain scoring on top of it."""

import math

import numpy as np
import pytest

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from esmfold_peft.data.structures import Chain
from esmfold_peft.eval.chain_scores import CA, score_chain
from esmfold_peft.eval.pairing import ALIGNMENT, RESIDUE_NUMBER, PairingError, pair_chains, pair_residues
from openfold.np import residue_constants as rc

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


def make_chain(sequence, numbers=None, ca=None, name="x_A", chain_id="A", icodes=None, b_factors=None,
               ca_present=None):
    """A Chain with Cα atoms only (enough for every evaluation metric)."""
    n = len(sequence)
    numbers = np.arange(1, n + 1) if numbers is None else np.asarray(numbers)
    positions = np.zeros((n, 37, 3), np.float32)
    mask = np.zeros((n, 37), np.float32)
    bfac = np.zeros((n, 37), np.float32)
    if ca is None:
        ca = np.cumsum(np.tile([3.8, 0.0, 0.0], (n, 1)), axis=0)
    positions[:, CA] = ca
    mask[:, CA] = 1.0 if ca_present is None else np.asarray(ca_present, np.float32)
    if b_factors is not None:
        bfac[:, CA] = b_factors
    return Chain(name=name, chain_id=chain_id, sequence=sequence,
                 aatype=np.array([rc.restype_order_with_x.get(a, 20) for a in sequence], np.int64),
                 atom37_positions=positions, atom37_mask=mask, b_factors=bfac,
                 residue_index=numbers.astype(np.int64), insertion_codes=icodes or [""] * n,
                 resolution=math.nan, release_date=None, source=f"{name}.pdb")


def random_walk(rng, n, step=3.8):
    steps = rng.normal(size=(n, 3))
    steps *= step / np.linalg.norm(steps, axis=1, keepdims=True)
    return np.cumsum(steps, axis=0)


def test_same_numbering_pairs_by_residue_number():
    ref = make_chain(SEQ[10:40], numbers=range(11, 41))
    pred = make_chain(SEQ, numbers=range(1, len(SEQ) + 1))
    p = pair_residues(pred, ref)
    assert p.method == RESIDUE_NUMBER
    np.testing.assert_array_equal(p.ref_index, np.arange(30))
    np.testing.assert_array_equal(p.pred_index, np.arange(10, 40))
    assert p.n_identical == 30


def test_renumbered_prediction_against_gapped_reference_pairs_by_alignment():
    # Reference: sequence positions 0..10 and 16..35 (0-based), author-numbered 20..30 and 36..55 (the
    # gap is 5 unobserved residues). Prediction: the full sequence renumbered from 1, so its residue 20
    # is sequence position 19, not the reference's residue 20: numbering disagrees, alignment pairs.
    kept = list(range(0, 11)) + list(range(16, 36))
    sequence = "".join(SEQ[i] for i in kept)
    pred = make_chain(SEQ)
    p = pair_residues(pred, make_chain(sequence, numbers=[i + 20 for i in kept]))
    assert p.method == ALIGNMENT
    np.testing.assert_array_equal(p.pred_index, kept)
    np.testing.assert_array_equal(p.ref_index, np.arange(len(kept)))
    assert p.n_identical == len(kept)
    # The same reference numbered like the prediction (position + 1) pairs by number, identically.
    q = pair_residues(pred, make_chain(sequence, numbers=[i + 1 for i in kept]))
    assert q.method == RESIDUE_NUMBER
    np.testing.assert_array_equal(q.pred_index, kept)


def test_insertion_codes_are_part_of_the_residue_key():
    seq = "ACDEF"
    numbers, icodes = [50, 51, 52, 52, 53], ["", "", "", "A", ""]
    ref = make_chain(seq, numbers=numbers, icodes=icodes)
    pred = make_chain(seq, numbers=numbers, icodes=icodes)
    p = pair_residues(pred, ref)
    assert p.method == RESIDUE_NUMBER
    np.testing.assert_array_equal(p.pred_index, np.arange(5))


def test_point_mutation_falls_back_to_alignment_and_still_pairs_the_mutated_residue():
    mutated = SEQ[:20] + "W" + SEQ[21:]
    p = pair_residues(make_chain(SEQ), make_chain(mutated))
    assert p.method == ALIGNMENT
    np.testing.assert_array_equal(p.pred_index, np.arange(len(SEQ)))
    assert p.n_identical == len(SEQ) - 1


def test_unknown_residue_matches_anything_under_numbering():
    ref = make_chain(SEQ[:10].replace("K", "X"))
    p = pair_residues(make_chain(SEQ[:10]), ref)
    assert p.method == RESIDUE_NUMBER and len(p) == 10


def test_pair_chains_single_chains_pair_whatever_their_ids():
    pred = make_chain(SEQ, name="p_A", chain_id="A")
    ref = make_chain(SEQ, name="r_B", chain_id="B")
    pairs, problems = pair_chains([pred], [ref])
    assert pairs == [(pred, ref)] and problems == []


def test_pair_chains_by_id_and_report_missing():
    pred = [make_chain(SEQ, name="p_A", chain_id="A"), make_chain(SEQ, name="p_B", chain_id="B")]
    ref = [make_chain(SEQ, name="r_B", chain_id="B"), make_chain(SEQ, name="r_C", chain_id="C")]
    pairs, problems = pair_chains(pred, ref)
    assert pairs == [(pred[1], ref[0])]
    assert len(problems) == 1 and "'C'" in problems[0] and "r_C" in problems[0]


def test_score_chain_counts_unpredicted_reference_residues_as_missed():
    rng = np.random.default_rng(0)
    ca = random_walk(rng, 30)
    ref = make_chain(SEQ[:30], ca=ca)
    full = score_chain(make_chain(SEQ[:30], ca=ca), ref)
    assert full.lddt.global_pooled == 1.0 and full.superposition.gdt_ts == 1.0
    # the prediction lacks the last 5 residues: 25 scored of 30, GDT-TS 25/30, LDDT below 1
    partial = score_chain(make_chain(SEQ[:25], ca=ca[:25]), ref)
    assert partial.n_scored == 25 and partial.n_ref_with_ca == 30
    assert partial.superposition.gdt_ts == pytest.approx(25 / 30)
    assert partial.lddt.global_pooled < 1.0
    assert np.all(partial.lddt.per_residue[25:] == 0.0)


def test_score_chain_ignores_residues_absent_from_the_reference():
    rng = np.random.default_rng(1)
    ca = random_walk(rng, 30)
    ref_present = np.ones(30)
    ref_present[10:15] = 0  # unobserved in the reference
    ref = make_chain(SEQ[:30], ca=ca, ca_present=ref_present)
    pred_ca = ca.copy()
    pred_ca[10:15] += 50.0  # absurd there: must not matter
    s = score_chain(make_chain(SEQ[:30], ca=pred_ca), ref)
    assert s.lddt.global_pooled == 1.0 and s.superposition.gdt_ts == 1.0
    assert s.superposition.rmsd == pytest.approx(0.0, abs=1e-5)
    assert s.n_scored == 25 and np.isnan(s.lddt.per_residue[10:15]).all()


def test_score_chain_reads_plddt_from_ca_b_factors():
    rng = np.random.default_rng(2)
    ca = random_walk(rng, 20)
    plddt = np.linspace(40, 90, 20)
    s = score_chain(make_chain(SEQ[:20], ca=ca, b_factors=plddt), make_chain(SEQ[:20], ca=ca))
    np.testing.assert_allclose(s.plddt, plddt, rtol=1e-6)
    assert s.mean_plddt == pytest.approx(plddt.mean(), rel=1e-6)
    # constant or out-of-range B-factors are not pLDDT
    assert score_chain(make_chain(SEQ[:20], ca=ca, b_factors=np.full(20, 30.0)), make_chain(SEQ[:20], ca=ca)).plddt is None
    assert score_chain(make_chain(SEQ[:20], ca=ca, b_factors=plddt * 2), make_chain(SEQ[:20], ca=ca)).plddt is None


def test_unpairable_chains_raise_pairing_error():
    ref = make_chain("ACDEF", ca_present=np.zeros(5))  # no observed Cα at all
    with pytest.raises(PairingError, match="no reference Cα"):
        score_chain(make_chain("ACDEF"), ref)
