"""Structures built from the sequence length alone, scored exactly as a model is: what a number is worth.

A LDDT-Cα of 0.21 means little until one knows what a structure with no information scores. Two
baselines, Cα only, laid out along the reference chain (residue i of the baseline stands for reference
residue i; reference residues without a Cα are left out as for a model):

* **helix**: an ideal α-helix, rise 1.5 Å per residue, radius 2.3 Å, 100° per residue (Cα–Cα 3.8 Å);
* **compact**: an uninformative compact chain, a self-avoiding random walk with 3.8 Å steps (no two
  non-consecutive Cα closer than 3.8 Å while it is grown, inside a ball of the right size), scaled about
  its centre to the radius of gyration of a globule of that length, Rg = 2.2 · N^0.38 Å. Scores are the
  mean over the walks of `COMPACT_SEEDS` (fixed, so a report is reproducible).

A model's headline is read as its margin above the better of the two (`margin`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np

from esmfold_peft.eval.lddt import LDDT_CUTOFF, lddt_ca
from esmfold_peft.eval.metrics import superposition_scores

HELIX_RISE, HELIX_RADIUS, HELIX_TURN_DEGREES = 1.5, 2.3, 100.0
STEP = 3.8  # Å, consecutive Cα
COMPACT_SEEDS = (0, 1, 2)
_TRIES = 200  # random directions tried per step before the walk takes the least crowded one
BASELINES = ("helix", "compact")
METRICS = ("lddt_ca", "tm_score", "gdt_ts")


def ideal_helix(n: int) -> np.ndarray:
    """[n, 3] Cα coordinates of an ideal α-helix."""
    i = np.arange(n, dtype=np.float64)
    theta = np.deg2rad(HELIX_TURN_DEGREES) * i
    return np.stack([HELIX_RADIUS * np.cos(theta), HELIX_RADIUS * np.sin(theta), HELIX_RISE * i], axis=1)


def globule_radius_of_gyration(n: int) -> float:
    """Rg (Å) of a compact globular protein of n residues, 2.2 · n^0.38."""
    return 2.2 * n ** 0.38


@functools.lru_cache(maxsize=256)  # chains of one length share their walks (callers must not modify them)
def compact_chain(n: int, seed: int) -> np.ndarray:
    """[n, 3] Cα coordinates of a compact self-avoiding random walk with 3.8 Å steps (module docstring).

    The walk grows inside a ball whose uniform radius of gyration is the globule's (radius √(5/3)·Rg),
    each step the first of `_TRIES` random directions that stays in the ball and at least 3.8 Å from every
    earlier non-consecutive Cα (else the least crowded of them); the result is then scaled about its centre
    to exactly the globule's Rg (a factor near 1, so steps stay near 3.8 Å).
    """
    rng = np.random.default_rng(seed)
    target = globule_radius_of_gyration(max(n, 1))
    ball = math.sqrt(5.0 / 3.0) * target
    x = np.zeros((max(n, 1), 3))
    for k in range(1, n):
        directions = rng.normal(size=(_TRIES, 3))
        candidates = x[k - 1] + STEP * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        outside = np.maximum(np.linalg.norm(candidates, axis=1) - ball, 0.0)
        nearest = (np.linalg.norm(candidates[:, None, :] - x[None, :k - 1, :], axis=-1).min(axis=1)
                   if k >= 2 else np.full(_TRIES, np.inf))
        free = np.flatnonzero((nearest >= STEP) & (outside == 0.0))
        x[k] = candidates[free[0] if len(free) else int(np.argmax(np.minimum(nearest, STEP) - 10.0 * outside))]
    x = x[:n]
    if n < 2:
        return x
    centred = x - x.mean(axis=0)
    rg = math.sqrt(float((centred ** 2).sum(axis=1).mean()))
    return centred * (target / rg)


def _scores(pred: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray, cutoff: float, superpose: bool) -> dict:
    scores = {"lddt_ca": lddt_ca(pred, ref, ref_mask, cutoff=cutoff).global_pooled}
    if superpose:
        sup = superposition_scores(pred[ref_mask], ref[ref_mask], n_reference=int(ref_mask.sum()))
        scores.update(tm_score=sup.tm_score, gdt_ts=sup.gdt_ts)
    return scores


def baseline_scores(ref_ca: np.ndarray, ref_mask: Optional[np.ndarray] = None, cutoff: float = LDDT_CUTOFF,
                    superpose: bool = True) -> dict[str, dict[str, float]]:
    """{"helix": {...}, "compact": {...}}: LDDT-Cα (global pooled) and, with `superpose`, TM-score and GDT-TS
    of each baseline against a reference chain's Cα ([n, 3], `ref_mask` [n] where the Cα exists).

    A reference scored again (several models evaluated against the same structures in one process) is
    looked up, not searched again: the scores depend on the reference alone."""
    ref = np.asarray(ref_ca, dtype=np.float64)
    mask = np.ones(len(ref), dtype=bool) if ref_mask is None else np.asarray(ref_mask, dtype=bool)
    ref = np.where(mask[:, None], ref, 0.0)
    scores = _reference_baselines(ref.tobytes(), mask.tobytes(), float(cutoff), bool(superpose))
    return {name: dict(values) for name, values in scores.items()}  # a copy: callers may keep or change it


@functools.lru_cache(maxsize=1024)
def _reference_baselines(ref_bytes: bytes, mask_bytes: bytes, cutoff: float, superpose: bool) -> dict:
    ref = np.frombuffer(ref_bytes, dtype=np.float64).reshape(-1, 3).copy()  # writable: torch reads it in lddt_ca
    mask = np.frombuffer(mask_bytes, dtype=bool).copy()
    n = len(ref)
    out = {"helix": _scores(ideal_helix(n), ref, mask, cutoff, superpose)}
    walks = [_scores(compact_chain(n, s), ref, mask, cutoff, superpose) for s in COMPACT_SEEDS]
    out["compact"] = {k: float(np.mean([w[k] for w in walks])) for k in walks[0]}
    return out


def mean_baselines(per_chain: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, Optional[float]]]:
    """Each baseline's metrics averaged over chains (unweighted, as the model's mean over chains)."""
    out: dict[str, dict[str, Optional[float]]] = {}
    for name in BASELINES:
        out[name] = {}
        for metric in METRICS:
            values = [c[name][metric] for c in per_chain if metric in c[name] and math.isfinite(c[name][metric])]
            if values or any(metric in c[name] for c in per_chain):
                out[name][metric] = float(np.mean(values)) if values else None
    return out


def margin(model_value: Optional[float], baselines: dict[str, dict[str, Optional[float]]],
           metric: str = "lddt_ca") -> Optional[dict]:
    """How far `model_value` lies above the better baseline for `metric`: {"better_baseline", "baseline",
    "margin"}; None when a value is missing."""
    values = {name: baselines[name].get(metric) for name in BASELINES
              if name in baselines and baselines[name].get(metric) is not None}
    if model_value is None or not values:
        return None
    best = max(values, key=values.get)
    return {"better_baseline": best, "baseline": values[best], "margin": float(model_value - values[best])}


def margin_text(model_value: Optional[float], baselines: dict, metric: str = "lddt_ca",
                label: str = "LDDT-Cα") -> str:
    """"LDDT-Cα 0.213, 0.05 above the better sequence-only baseline (compact chain 0.163)"."""
    m = margin(model_value, baselines, metric)
    if m is None:
        return f"{label} {model_value if model_value is None else f'{model_value:.3f}'} (no baseline)"
    word = "above" if m["margin"] >= 0 else "below"
    name = {"helix": "ideal α-helix", "compact": "compact random chain"}[m["better_baseline"]]
    return (f"{label} {model_value:.3f}, {abs(m['margin']):.3f} {word} the better sequence-only baseline "
            f"({name} {m['baseline']:.3f})")
