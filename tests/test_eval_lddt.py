"""LDDT-Cα against a naive loop formulation, hand-computed cases, and OpenFold's implementation."""

import math

import numpy as np
import pytest
import torch

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from esmfold_peft.eval.lddt import LDDT_THRESHOLDS, lddt_ca, lddt_ca_torch


def naive_lddt(pred, ref, ref_mask, pred_mask=None, cutoff=15.0, thresholds=LDDT_THRESHOLDS):
    """The definition of docs/method.md §4 written as plain loops: (pooled, per-residue list, ordered pairs)."""
    n = len(ref)
    pred_mask = [True] * n if pred_mask is None else pred_mask
    total, count = 0.0, 0
    per_residue = []
    for i in range(n):
        r_total, r_count = 0.0, 0
        for j in range(n):
            if i == j or not ref_mask[i] or not ref_mask[j]:
                continue
            d_ref = math.dist(ref[i], ref[j])
            if not d_ref < cutoff:
                continue
            if pred_mask[i] and pred_mask[j]:
                d_pred = math.dist(pred[i], pred[j])
                score = sum(abs(d_pred - d_ref) < t for t in thresholds) / len(thresholds)
            else:
                score = 0.0
            r_total += score
            r_count += 1
        per_residue.append(r_total / r_count if r_count else math.nan)
        total += r_total
        count += r_count
    return (total / count if count else math.nan), per_residue, count


def random_walk(rng, n, step=3.8):
    steps = rng.normal(size=(n, 3))
    steps *= step / np.linalg.norm(steps, axis=1, keepdims=True)
    return np.cumsum(steps, axis=0)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def assert_matches_naive(pred, ref, ref_mask, pred_mask=None, cutoff=15.0):
    got = lddt_ca(pred, ref, ref_mask, pred_mask, cutoff=cutoff)
    pooled, per_residue, n_pairs = naive_lddt(pred.tolist(), ref.tolist(), list(ref_mask),
                                              None if pred_mask is None else list(pred_mask), cutoff)
    assert got.n_pairs == n_pairs
    np.testing.assert_allclose(got.global_pooled, pooled, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.per_residue, per_residue, rtol=0, atol=1e-12)  # NaNs must coincide
    np.testing.assert_allclose(got.mean_per_residue, np.nanmean(per_residue), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.score_sum / got.n_pairs, pooled, rtol=0, atol=1e-12)
    return got


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_loops_on_random_and_perturbed_structures(seed):
    rng = np.random.default_rng(seed)
    n = 40
    ref = random_walk(rng, n)
    pred = ref + rng.normal(scale=[0.1, 0.5, 1.0, 2.0, 4.0, 8.0][seed], size=ref.shape)
    ref_mask = rng.random(n) > 0.15  # residues missing in the reference
    ref[~ref_mask] = np.nan  # never read
    pred_mask = rng.random(n) > 0.1 if seed % 2 else None
    assert_matches_naive(pred, ref, ref_mask, pred_mask)


def test_matches_naive_loops_with_other_cutoff():
    rng = np.random.default_rng(11)
    ref = random_walk(rng, 30)
    pred = ref + rng.normal(scale=1.5, size=ref.shape)
    assert_matches_naive(pred, ref, np.ones(30, bool), cutoff=8.0)


@pytest.mark.parametrize("pred_distance, expected", [
    # reference distance 3 Å; |d_pred - d_ref| is exactly a threshold, and "< threshold" does not count it
    (3.5, 0.75),  # diff 0.5: fails 0.5, passes 1, 2, 4
    (4.0, 0.50),  # diff 1: passes 2, 4
    (5.0, 0.25),  # diff 2: passes 4
    (7.0, 0.00),  # diff 4: passes none
    (2.5, 0.75),  # diff -0.5 (shorter): same as +0.5
])
def test_exact_ties_at_thresholds_do_not_count(pred_distance, expected):
    ref = np.array([[0.0, 0, 0], [3.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [pred_distance, 0, 0]])
    got = assert_matches_naive(pred, ref, np.ones(2, bool))
    assert got.global_pooled == expected
    assert got.n_pairs == 2  # ordered pairs (0, 1) and (1, 0)


def test_reference_distance_exactly_at_cutoff_is_not_scored():
    ref = np.array([[0.0, 0, 0], [15.0, 0, 0], [16.0, 0, 0]])  # 0-1 = 15 (excluded), 1-2 = 1
    got = lddt_ca(ref, ref)
    assert got.n_pairs == 2
    assert math.isnan(got.per_residue[0])  # residue 0 has no scored pair
    assert got.global_pooled == 1.0


def test_hand_computed_four_residues_pooled_differs_from_mean_per_residue():
    # Reference Cα on a line at x = 0, 3, 6, 20. Distances < 15 Å: 0-1 (3), 0-2 (6), 1-2 (3), 2-3 (14);
    # 1-3 (17) and 0-3 (20) are not scored.
    # Prediction moves residue 3 to x = 21: d(2,3) = 15, |15 - 14| = 1 -> passes 2 and 4 only -> 0.5;
    # every other scored pair is exact -> 1.
    # Pooled: (1 + 1 + 1 + 0.5) / 4 unordered pairs = 0.875 (8 ordered pairs).
    # Per residue: r0: (1 + 1)/2 = 1; r1: 1; r2: (1 + 1 + 0.5)/3 = 0.8333...; r3: 0.5.
    # Mean per residue: (1 + 1 + 0.8333 + 0.5) / 4 = 0.8333...
    ref = np.array([[0.0, 0, 0], [3.0, 0, 0], [6.0, 0, 0], [20.0, 0, 0]])
    pred = ref.copy()
    pred[3, 0] = 21.0
    got = assert_matches_naive(pred, ref, np.ones(4, bool))
    assert got.n_pairs == 8
    assert got.global_pooled == pytest.approx(0.875, abs=1e-12)
    np.testing.assert_allclose(got.per_residue, [1.0, 1.0, 2.5 / 3, 0.5], atol=1e-12)
    assert got.mean_per_residue == pytest.approx((1 + 1 + 2.5 / 3 + 0.5) / 4, abs=1e-12)


def test_hand_computed_triangle():
    # Reference right triangle A(0,0,0), B(3,0,0), C(0,4,0): AB 3, AC 4, BC 5.
    # Prediction moves B to (3.7, 0, 0): AB 3.7 (diff 0.7 -> fails 0.5 -> 0.75), AC 4 (1),
    # BC sqrt(3.7² + 16) = 5.4489 (diff 0.449 -> 1).
    # Pooled (0.75 + 1 + 1) / 3 = 0.91667; per residue A (0.75 + 1)/2, B (0.75 + 1)/2, C 1.
    ref = np.array([[0.0, 0, 0], [3.0, 0, 0], [0.0, 4, 0]])
    pred = np.array([[0.0, 0, 0], [3.7, 0, 0], [0.0, 4, 0]])
    got = assert_matches_naive(pred, ref, np.ones(3, bool))
    assert got.global_pooled == pytest.approx(2.75 / 3, abs=1e-12)
    np.testing.assert_allclose(got.per_residue, [0.875, 0.875, 1.0], atol=1e-12)


def test_residue_missing_in_reference_is_excluded_from_both_sides():
    # Middle residue absent from the reference; the prediction places it absurdly (and NaN would do too).
    ref = np.array([[0.0, 0, 0], [np.nan, np.nan, np.nan], [5.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [100.0, 100, 100], [5.0, 0, 0]])
    got = assert_matches_naive(pred, ref, np.array([True, False, True]))
    assert got.n_pairs == 2 and got.global_pooled == 1.0
    assert math.isnan(got.per_residue[1])


def test_residue_missing_in_prediction_scores_zero():
    # Residue 2 is in the reference but the prediction lacks it: its pairs count, and score 0.
    # Pairs 0-1 (1), 0-2 (0), 1-2 (0): pooled 1/3; per residue 0.5, 0.5, 0.
    ref = np.array([[0.0, 0, 0], [3.0, 0, 0], [6.0, 0, 0]])
    got = assert_matches_naive(ref.copy(), ref, np.ones(3, bool), np.array([True, True, False]))
    assert got.global_pooled == pytest.approx(1 / 3)
    np.testing.assert_allclose(got.per_residue, [0.5, 0.5, 0.0])


def test_identical_structures_score_one():
    ref = random_walk(np.random.default_rng(3), 50)
    got = lddt_ca(ref, ref)
    assert got.global_pooled == 1.0 and got.mean_per_residue == 1.0
    assert np.all(got.per_residue == 1.0)


def test_invariant_under_rigid_motion_of_the_prediction():
    rng = np.random.default_rng(4)
    ref = random_walk(rng, 60)
    pred = ref + rng.normal(scale=1.0, size=ref.shape)
    moved = pred @ random_rotation(rng).T + np.array([30.0, -12.0, 7.5])
    a, b = lddt_ca(pred, ref), lddt_ca(moved, ref)
    assert a.global_pooled == pytest.approx(b.global_pooled, abs=1e-9)
    np.testing.assert_allclose(a.per_residue, b.per_residue, atol=1e-9)


def test_torch_batched_agrees_with_numpy_per_chain():
    rng = np.random.default_rng(5)
    lengths, n_max = [25, 40, 10], 40
    pred = np.zeros((3, n_max, 3))
    ref = np.zeros((3, n_max, 3))
    mask = np.zeros((3, n_max), bool)
    for b, n in enumerate(lengths):  # padded batch; chain 1 also misses two reference residues
        ref[b, :n] = random_walk(rng, n)
        pred[b, :n] = ref[b, :n] + rng.normal(scale=1.0 + b, size=(n, 3))
        mask[b, :n] = True
    mask[1, [3, 17]] = False
    batch = lddt_ca_torch(torch.from_numpy(pred), torch.from_numpy(ref), torch.from_numpy(mask))
    batch32 = lddt_ca_torch(torch.from_numpy(pred).float(), torch.from_numpy(ref).float(), torch.from_numpy(mask))
    for b, n in enumerate(lengths):
        one = lddt_ca(pred[b, :n], ref[b, :n], mask[b, :n])
        assert batch.global_pooled[b].item() == pytest.approx(one.global_pooled, abs=1e-12)
        assert batch.mean_per_residue[b].item() == pytest.approx(one.mean_per_residue, abs=1e-12)
        assert batch.n_pairs[b].item() == one.n_pairs
        np.testing.assert_allclose(batch.per_residue[b, :n].numpy(), one.per_residue, atol=1e-12)
        assert torch.isnan(batch.per_residue[b, n:]).all()  # padding has no pairs
        # float32 distances can land on the other side of a threshold for a rare pair
        assert batch32.global_pooled[b].item() == pytest.approx(one.global_pooled, abs=2e-3)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        lddt_ca(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="ref_mask"):
        lddt_ca_torch(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.ones(1, 5))


# --- OpenFold ----------------------------------------------------------------------------------

def openfold_lddt(pred, ref, mask, per_residue):
    from openfold.utils.loss import lddt

    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    return lddt(t(pred), t(ref), t(mask)[..., None], per_residue=per_residue).numpy()


@pytest.mark.parametrize("seed", range(3))
def test_openfold_pooled_and_per_residue_match_up_to_eps(seed):
    """openfold's `per_residue=False` is our pooled global score, `per_residue=True` our per-residue
    score, both up to its eps = 1e-10 (in the square root and in numerator and denominator)."""
    rng = np.random.default_rng(seed)
    n = 50
    ref = random_walk(rng, n)
    pred = ref + rng.normal(scale=1.5, size=ref.shape)
    mask = rng.random(n) > 0.2
    ours = lddt_ca(pred, np.where(mask[:, None], ref, 0.0), mask)
    pooled = openfold_lddt(pred, np.where(mask[:, None], ref, 0.0), mask, per_residue=False)
    per_res = openfold_lddt(pred, np.where(mask[:, None], ref, 0.0), mask, per_residue=True)
    assert float(pooled) == pytest.approx(ours.global_pooled, abs=1e-9)
    has_pairs = np.isfinite(ours.per_residue)
    np.testing.assert_allclose(per_res[has_pairs], ours.per_residue[has_pairs], atol=1e-9)
    # where we say NaN (no scored pair: masked residues), openfold returns eps / eps = 1
    np.testing.assert_allclose(per_res[~has_pairs], 1.0)
    assert (~has_pairs).sum() >= 1


def test_openfold_counts_exact_ties_because_of_its_eps():
    """sqrt(eps + d²) pulls |3.5 - 3.0| just below 0.5 in float64, so OpenFold counts the tie; we do not."""
    ref = np.array([[0.0, 0, 0], [3.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [3.5, 0, 0]])
    assert lddt_ca(pred, ref).global_pooled == 0.75
    assert float(openfold_lddt(pred, ref, np.ones(2), per_residue=False)) == pytest.approx(1.0, abs=1e-9)


def test_half_precision_inputs_are_scored_in_float32():
    rng = np.random.default_rng(8)
    ref = random_walk(rng, 30)
    pred = ref + rng.normal(scale=1.0, size=ref.shape)
    t = lambda a: torch.from_numpy(a)[None].to(torch.bfloat16)  # noqa: E731
    out = lddt_ca_torch(t(pred), t(ref), torch.ones(1, 30))
    assert out.global_pooled.dtype == torch.float32
    expected = lddt_ca(t(pred)[0].double().numpy(), t(ref)[0].double().numpy()).global_pooled
    assert out.global_pooled.item() == pytest.approx(expected, abs=1e-2)
