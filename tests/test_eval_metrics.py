"""Kabsch, RMSD, GDT-TS and TM-score: known cases, invariances, and TMscore.f's search as a floor."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from esmfold_peft.eval.metrics import (GDT_TS_CUTOFFS, kabsch, rmsd_ca, superpose, superposition_scores,
                                       tm_d0)


def random_walk(rng, n, step=3.8):
    steps = rng.normal(size=(n, 3))
    steps *= step / np.linalg.norm(steps, axis=1, keepdims=True)
    return np.cumsum(steps, axis=0)


def rigid_motion(rng, x):
    return x @ Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix().T + rng.normal(scale=20, size=3)


def scipy_rmsd(pred, ref):
    """RMSD after superposition by an independent implementation (scipy's align_vectors)."""
    a, b = ref - ref.mean(0), pred - pred.mean(0)
    _, rssd = Rotation.align_vectors(a, b)
    return rssd / math.sqrt(len(a))


def test_kabsch_recovers_a_rotation_and_translation():
    rng = np.random.default_rng(0)
    x = random_walk(rng, 20)
    rot = Rotation.random(random_state=1).as_matrix()
    y = x @ rot.T + np.array([1.0, -2.0, 3.0])
    r, t = kabsch(x, y)
    np.testing.assert_allclose(r, rot, atol=1e-10)
    np.testing.assert_allclose(t, [1.0, -2.0, 3.0], atol=1e-9)
    np.testing.assert_allclose(superpose(x, y), y, atol=1e-9)


def test_rmsd_known_case_scaled_square():
    # Square (±1, ±1, 0) against the same square scaled by 2: by symmetry the best superposition is the
    # identity, each corner is off by |(1, 1)| = √2, so RMSD = √2, whatever rigid motion is applied first.
    ref = np.array([[1.0, 1, 0], [1, -1, 0], [-1, -1, 0], [-1, 1, 0]])
    pred = 2 * ref
    assert rmsd_ca(pred, ref) == pytest.approx(math.sqrt(2), abs=1e-12)
    assert rmsd_ca(rigid_motion(np.random.default_rng(1), pred), ref) == pytest.approx(math.sqrt(2), abs=1e-9)


def test_rmsd_matches_scipy_and_is_invariant_under_rigid_motion():
    rng = np.random.default_rng(2)
    ref = random_walk(rng, 50)
    pred = ref + rng.normal(scale=2.0, size=ref.shape)
    expected = scipy_rmsd(pred, ref)
    assert rmsd_ca(pred, ref) == pytest.approx(expected, abs=1e-9)
    assert rmsd_ca(rigid_motion(rng, pred), ref) == pytest.approx(expected, abs=1e-9)
    assert rmsd_ca(pred + 900.0, ref - 700.0) == pytest.approx(expected, abs=1e-9)  # far from the origin


def test_reflection_guard_mirror_image_is_not_superposable():
    ref = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])  # chiral
    mirror = ref * np.array([1, 1, -1])
    r, _ = kabsch(mirror, ref)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert rmsd_ca(mirror, ref) > 0.1  # an improper "rotation" would give 0
    assert rmsd_ca(mirror, ref) == pytest.approx(scipy_rmsd(mirror, ref), abs=1e-9)


def test_identical_structures_score_perfectly():
    ref = random_walk(np.random.default_rng(3), 40)
    s = superposition_scores(rigid_motion(np.random.default_rng(4), ref), ref)
    assert s.rmsd == pytest.approx(0.0, abs=1e-9)
    assert s.gdt_ts == 1.0 and all(f == 1.0 for f in s.gdt_fractions.values())
    assert s.tm_score == pytest.approx(1.0, abs=1e-12)


def two_separated_halves(rng):
    """Two compact 10-residue clouds; the prediction keeps cloud A and translates cloud B by 100 Å.

    A rigid motion within 8 Å of a residue of A and of one of B would need
    |(R - I)(b - a) + R v| <= 16 with |v| = 100, impossible while |b - a| < 42 Å. So the best
    superposition keeps exactly 10 of the 20 residues within every cutoff: GDT-TS = 10/20 = 0.5.
    """
    a = rng.normal(scale=3.0, size=(10, 3))
    b = rng.normal(scale=3.0, size=(10, 3)) + np.array([8.0, 0, 0])
    ref = np.concatenate([a, b])
    assert np.linalg.norm(a[:, None] - b[None], axis=-1).max() < 42
    pred = np.concatenate([a, b + np.array([100.0, 0, 0])])
    return pred, ref


def test_gdt_known_case_two_separated_halves():
    pred, ref = two_separated_halves(np.random.default_rng(5))
    s = superposition_scores(rigid_motion(np.random.default_rng(6), pred), ref)
    assert s.gdt_ts == pytest.approx(0.5, abs=1e-12)
    assert s.gdt_fractions == {c: pytest.approx(0.5, abs=1e-12) for c in GDT_TS_CUTOFFS}


def test_gdt_denominator_counts_unpaired_reference_residues():
    # The same 20 paired residues, but the reference has 25 residues with a Cα: 10/25 = 0.4.
    pred, ref = two_separated_halves(np.random.default_rng(7))
    assert superposition_scores(pred, ref, n_reference=25).gdt_ts == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError, match="n_reference"):
        superposition_scores(pred, ref, n_reference=19)


def test_tm_d0_formula():
    assert tm_d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)
    assert tm_d0(15) == 0.5 and tm_d0(16) == 0.5  # 1.24 - 1.8 < 0.5 is clamped


def tmscore_f_search(pred, ref, n_reference):
    """A direct, per-seed port of the search loop of Zhang's TMscore.f (GDT counts and TM-score).

    Kabsch via scipy's align_vectors, so it shares no code with the module under test.
    """
    n = len(pred)
    d0 = tm_d0(n_reference)
    d0_search = min(max(d0, 4.5), 8.0)
    lengths, min_len = [], min(4, n)
    for k in range(5):
        length = n // 2 ** k
        if length <= min_len:
            break
        lengths.append(length)
    lengths.append(min_len)

    best = {"counts": [-1] * 4, "tm": -1.0}

    def superpose_on(idx):
        idx = sorted(idx)
        p, r = pred[idx], ref[idx]
        rot, _ = Rotation.align_vectors(r - r.mean(0), p - p.mean(0))
        moved = rot.apply(pred - p.mean(0)) + r.mean(0)
        dist = np.linalg.norm(moved - ref, axis=1)
        for k, c in enumerate(GDT_TS_CUTOFFS):
            best["counts"][k] = max(best["counts"][k], int(np.sum(dist <= c)))
        best["tm"] = max(best["tm"], float(np.sum(1 / (1 + (dist / d0) ** 2))) / n_reference)
        return dist

    def select(dist, d):
        while True:
            chosen = [i for i in range(n) if dist[i] < d]
            if len(chosen) >= 3 or n <= 3:
                return chosen
            d += 0.5

    for length in lengths:
        for start in range(n - length + 1):
            dist = superpose_on(range(start, start + length))
            cut = select(dist, d0_search - 1)
            for _ in range(20):
                dist = superpose_on(cut)
                new = select(dist, d0_search + 1)
                if new == cut:
                    break
                cut = new
    return [c / n_reference for c in best["counts"]], best["tm"]


@pytest.mark.parametrize("seed, noise", [(10, 1.0), (11, 3.0), (12, 6.0)])
def test_search_is_at_least_tmscore_f(seed, noise):
    rng = np.random.default_rng(seed)
    n = 24
    ref = random_walk(rng, n)
    pred = ref + rng.normal(scale=noise, size=ref.shape)
    pred[n // 2:] += np.array([3.0, 0, 0])  # a shifted domain, so local seeds matter
    fractions, tm = tmscore_f_search(pred, ref, n_reference=n + 2)
    s = superposition_scores(pred, ref, n_reference=n + 2)
    for k, c in enumerate(GDT_TS_CUTOFFS):
        assert s.gdt_fractions[c] >= fractions[k] - 1e-12
    assert s.tm_score >= tm - 1e-9
    assert s.gdt_ts <= 1.0 and 0.0 <= s.tm_score <= 1.0


def test_scores_invariant_under_rigid_motion_of_the_prediction():
    rng = np.random.default_rng(13)
    ref = random_walk(rng, 30)
    pred = ref + rng.normal(scale=2.0, size=ref.shape)
    a = superposition_scores(pred, ref)
    b = superposition_scores(rigid_motion(rng, pred), ref)
    assert a.gdt_ts == pytest.approx(b.gdt_ts, abs=1e-12)
    assert a.tm_score == pytest.approx(b.tm_score, abs=1e-9)
    assert a.rmsd == pytest.approx(b.rmsd, abs=1e-9)


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        rmsd_ca(np.zeros((3, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="no paired residues"):
        superposition_scores(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        rmsd_ca(np.full((3, 3), np.nan), np.zeros((3, 3)))


def test_tiny_inputs_do_not_break_the_search():
    rng = np.random.default_rng(14)
    for n in (1, 2, 3, 4):
        s = superposition_scores(rng.normal(scale=20, size=(n, 3)), rng.normal(scale=5, size=(n, 3)))
        assert 0.0 <= s.gdt_ts <= 1.0 and 0.0 < s.tm_score <= 1.0 and math.isfinite(s.rmsd)
