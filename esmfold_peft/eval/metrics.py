"""Superposition-based Cα metrics: RMSD, GDT-TS and TM-score.

All three compare paired Cα coordinates (`pred[k]` paired with `ref[k]`, built by
`esmfold_peft.eval.pairing`). Scales: RMSD in Å; GDT-TS and TM-score as fractions in [0, 1]
(multiply GDT-TS by 100 for CASP's percent scale).

* RMSD: after the optimal rigid superposition of all paired residues (Kabsch, with the
  reflection guard), over the paired residues only.
* GDT-TS: `(P1 + P2 + P4 + P8) / 4`, where `Pc` is the largest fraction of reference residues whose
  predicted Cα lies within `c` Å (`<=`, as LGA and TM-score count) of the reference Cα under some
  superposition, maximised separately for each cutoff. The denominator is the number of reference
  residues with a Cα, paired or not, so a residue the prediction lacks counts as a miss.
* TM-score (Zhang & Skolnick 2004): `max over superpositions of (1/N) Σ 1 / (1 + (d_k/d0)²)`,
  `N` the reference length, `d0 = max(1.24 (N - 15)^(1/3) - 1.8, 0.5)` (0.5 when N <= 15).

The maximum over superpositions is what LGA (Zemla 2003) approximates with an extensive search;
here it is approximated with the search of Zhang's TM-score program (read from `TMscore.f`), which
we extend with one track per GDT cutoff:

1. seeds: contiguous fragments of the paired residues, of lengths `n, n/2, n/4, ...` down to 4
   (at most 6 lengths, the last one 4), at every start position (stride 1);
2. superpose on a seed, then repeatedly select the residues within a selection radius and
   superpose on them again, until the selection stops changing or 20 rounds have run. The
   TM-score track selects with `d0_search - 1` first, then `d0_search + 1`
   (`d0_search = clip(d0, 4.5, 8)`), exactly as TMscore.f; the GDT tracks select with the cutoff
   itself (1, 2, 4 or 8 Å), as LGA's per-cutoff GDT search does. A selection of fewer than 3
   residues is widened by 0.5 Å steps, as TMscore.f does;
3. every superposition visited updates the best count at each GDT cutoff and the best TM-score.

Identical (track, selection) states reached from different seeds are superposed only once, which
is what makes the stride-1 search cheap. The result is a lower bound on the true maximum, and at
least what TMscore.f reports for the same residue pairing, GDT-TS and TM-score alike (every
superposition TMscore.f visits is visited here; the GDT tracks add more, so values can be higher).
LGA may find still better superpositions; we have no LGA binary here and have not measured the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GDT_TS_CUTOFFS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
"""GDT-TS distance cutoffs in Å."""

_MAX_ROUNDS = 20  # TMscore.f's n_it
_MAX_SEED_LENGTHS = 6  # TMscore.f's n_init_max
_MIN_SEED_LENGTH = 4  # TMscore.f's L_ini_min
_MIN_SELECTION = 3  # fewest residues a selection may hold before its radius is widened
_WIDEN_STEP = 0.5  # Å, TMscore.f's widening step
_CHUNK = 256  # superpositions evaluated at once (bounds memory at _CHUNK x n x 3 floats)


def _as_coords(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3]; got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite coordinates")
    return x


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = _as_coords(pred, "pred"), _as_coords(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape; got {pred.shape} and {ref.shape}")
    if len(pred) == 0:
        raise ValueError("no paired residues to superpose")
    return pred, ref


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal rigid superposition of `mobile` onto `target` (least squares, proper rotation).

    Returns `(rotation, translation)` with `mobile @ rotation.T + translation ≈ target`;
    `det(rotation) = +1` (the reflection guard flips the smallest singular direction).
    """
    mobile, target = _check_pair(mobile, target)
    rotation, mobile_centre, target_centre = _batched_kabsch(mobile, target, np.ones((1, len(mobile))))
    return rotation[0], target_centre[0] - mobile_centre[0] @ rotation[0].T


def superpose(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`mobile` moved by the optimal rigid superposition onto `target`."""
    rotation, translation = kabsch(mobile, target)
    return np.asarray(mobile, dtype=np.float64) @ rotation.T + translation


def rmsd_ca(pred: np.ndarray, ref: np.ndarray) -> float:
    """Cα RMSD in Å after the optimal superposition of all paired residues ([N, 3] each)."""
    pred, ref = _check_pair(pred, ref)
    return float(np.sqrt(np.mean(np.sum((superpose(pred, ref) - ref) ** 2, axis=-1))))


def tm_d0(n_reference: int) -> float:
    """TM-score's distance scale d0 for a reference of `n_reference` residues (TMscore.f)."""
    d0 = 1.24 * (n_reference - 15) ** (1.0 / 3.0) - 1.8 if n_reference > 15 else 0.5
    return max(d0, 0.5)


@dataclass(frozen=True)
class SuperpositionScores:
    """Scores from the superposition search (see the module docstring).

    Attributes:
        gdt_ts: mean of `gdt_fractions`, in [0, 1].
        gdt_fractions: cutoff (Å) -> best fraction of reference residues within it.
        tm_score: best TM-score, in [0, 1], normalised by `n_reference`.
        rmsd: RMSD (Å) after superposing all paired residues.
        n_paired: residues with a Cα in both structures.
        n_reference: reference residues with a Cα (the GDT and TM-score denominator).
        n_superpositions: superpositions evaluated by the search.
    """

    gdt_ts: float
    gdt_fractions: dict[float, float]
    tm_score: float
    rmsd: float
    n_paired: int
    n_reference: int
    n_superpositions: int


def _batched_kabsch(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Superpositions of x onto y on the residue subsets `w` ([M, N], 0/1 weights).

    Returns rotations [M, 3, 3], mobile centres [M, 3] and target centres [M, 3]; the moved
    coordinates are `(x - mobile_centre) @ R.T + target_centre`.
    """
    # Shift both to their overall centroid first, so the covariance below, Σ w x yᵀ - n cx cyᵀ,
    # does not cancel large numbers for structures far from the origin.
    x_origin, y_origin = x.mean(axis=0), y.mean(axis=0)
    x, y = x - x_origin, y - y_origin
    count = w.sum(axis=1, keepdims=True)
    cx = w @ x / count
    cy = w @ y / count
    outer = (x[:, :, None] * y[:, None, :]).reshape(len(x), 9)
    h = (w @ outer).reshape(-1, 3, 3) - count[:, :, None] * cx[:, :, None] * cy[:, None, :]
    u, _, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(vt.transpose(0, 2, 1) @ u.transpose(0, 2, 1)))
    sign[sign == 0] = 1.0
    fix = np.ones((len(w), 3))
    fix[:, 2] = sign
    rotation = vt.transpose(0, 2, 1) @ (fix[:, :, None] * u.transpose(0, 2, 1))
    return rotation, cx + x_origin, cy + y_origin


def _distances_after(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[M, N] distances between moved x and y for each subset in w, computed in chunks."""
    out = np.empty(w.shape, dtype=np.float64)
    for start in range(0, len(w), _CHUNK):
        block = w[start:start + _CHUNK]
        rotation, cx, cy = _batched_kabsch(x, y, block)
        shift = cy - np.matmul(cx[:, None], rotation.transpose(0, 2, 1))[:, 0]
        delta = np.matmul(x[None], rotation.transpose(0, 2, 1)) + (shift[:, None] - y[None])
        out[start:start + _CHUNK] = np.sqrt(np.sum(delta * delta, axis=-1))
    return out


def _select(dist: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Residues with distance < radius (per row), the radius widened in 0.5 Å steps while
    fewer than 3 are selected (TMscore.f's rule, for more than 3 residues). With at most 3
    residues an empty selection becomes all of them (there is nothing to superpose on otherwise)."""
    n = dist.shape[1]
    if n > _MIN_SELECTION:
        third = np.partition(dist, _MIN_SELECTION - 1, axis=1)[:, _MIN_SELECTION - 1]
        steps = np.where(third < radius, 0.0, np.floor((third - radius) / _WIDEN_STEP) + 1.0)
        radius = radius + _WIDEN_STEP * steps
    selected = dist < radius[:, None]
    selected[~selected.any(axis=1)] = True
    return selected


def _seed_masks(n: int) -> np.ndarray:
    """Contiguous fragments of lengths n, n/2, n/4, ... (TMscore.f's L_ini), every start."""
    min_len = min(_MIN_SEED_LENGTH, n)
    lengths = []
    for k in range(_MAX_SEED_LENGTHS - 1):
        length = n // 2 ** k
        if length <= min_len:
            break
        lengths.append(length)
    lengths.append(min_len)
    starts_lengths = [(s, length) for length in lengths for s in range(n - length + 1)]
    idx = np.arange(n)
    return np.stack([(idx >= s) & (idx < s + length) for s, length in starts_lengths])


def superposition_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    n_reference: int | None = None,
    gdt_cutoffs: tuple[float, ...] = GDT_TS_CUTOFFS,
) -> SuperpositionScores:
    """RMSD, GDT-TS and TM-score of paired Cα coordinates (see the module docstring).

    Args:
        pred: [N, 3] predicted Cα of the paired residues.
        ref: [N, 3] reference Cα of the same residues.
        n_reference: reference residues with a Cα, paired or not (>= N); defaults to N.
        gdt_cutoffs: GDT cutoffs in Å; the default gives GDT-TS.
    """
    pred, ref = _check_pair(pred, ref)
    n = len(pred)
    n_reference = n if n_reference is None else int(n_reference)
    if n_reference < n:
        raise ValueError(f"n_reference ({n_reference}) is smaller than the number of paired residues ({n})")
    cutoffs = np.asarray(gdt_cutoffs, dtype=np.float64)
    d0 = tm_d0(n_reference)
    d0_search = float(np.clip(d0, 4.5, 8.0))

    best_counts = np.zeros(len(cutoffs), dtype=np.int64)
    best_tm = 0.0
    n_superpositions = 0

    def visit(weights: np.ndarray) -> np.ndarray:
        nonlocal best_tm, n_superpositions
        dist = _distances_after(pred, ref, weights.astype(np.float64))
        counts = (dist[:, None, :] <= cutoffs[None, :, None]).sum(axis=-1)
        np.maximum(best_counts, counts.max(axis=0), out=best_counts)
        best_tm = max(best_tm, float((1.0 / (1.0 + (dist / d0) ** 2)).sum(axis=1).max()))
        n_superpositions += len(weights)
        return dist

    # Tracks: (first selection radius, later selection radius); TMscore.f's, then one per cutoff.
    first_radius = np.array([d0_search - 1.0, *cutoffs])
    next_radius = np.array([d0_search + 1.0, *cutoffs])
    n_tracks = len(first_radius)

    seeds = _seed_masks(n)
    seed_dist = visit(seeds)
    track = np.repeat(np.arange(n_tracks), len(seeds))
    selection = np.concatenate([_select(seed_dist, np.full(len(seeds), r)) for r in first_radius])

    seen: set[bytes] = set()
    for _ in range(_MAX_ROUNDS):
        keys = np.concatenate([track[:, None].astype(np.uint8), np.packbits(selection, axis=1)], axis=1)
        _, first = np.unique(keys, axis=0, return_index=True)
        fresh = [i for i in first if keys[i].tobytes() not in seen]
        if not fresh:
            break
        seen.update(keys[i].tobytes() for i in fresh)
        track, selection = track[fresh], selection[fresh]
        dist = visit(selection)
        selection = _select(dist, next_radius[track])

    fractions = best_counts / n_reference
    return SuperpositionScores(
        gdt_ts=float(fractions.mean()),
        gdt_fractions={float(c): float(f) for c, f in zip(cutoffs, fractions)},
        tm_score=best_tm / n_reference,
        rmsd=rmsd_ca(pred, ref),
        n_paired=n,
        n_reference=n_reference,
        n_superpositions=n_superpositions,
    )


def gdt_ts(pred: np.ndarray, ref: np.ndarray, n_reference: int | None = None) -> float:
    """GDT-TS in [0, 1] of paired Cα coordinates (the search of `superposition_scores`)."""
    return superposition_scores(pred, ref, n_reference).gdt_ts


def tm_score(pred: np.ndarray, ref: np.ndarray, n_reference: int | None = None) -> float:
    """TM-score in [0, 1] of paired Cα coordinates (the search of `superposition_scores`)."""
    return superposition_scores(pred, ref, n_reference).tm_score
