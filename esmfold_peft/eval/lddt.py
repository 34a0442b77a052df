"""LDDT-Cα (Mariani et al. 2013) in the AlphaFold 2 / OpenFold convention (docs/method.md §4).

Definition implemented here, for one chain of `L` residues with Cα coordinates:

* scored pairs: ordered pairs (i, j), i ≠ j, both residues present in the **reference**, whose
  reference Cα–Cα distance is `< cutoff` (15 Å by default);
* a pair's score: the fraction of the thresholds {0.5, 1, 2, 4} Å with
  `|d_pred - d_ref| < threshold` (strict: a difference of exactly 1 Å is not preserved at 1 Å);
* `global_pooled`: the sum of pair scores over all scored pairs divided by their number (pairs
  are pooled; this is NOT the mean of per-residue scores). OpenFold's validation metric is this
  number per chain, averaged over chains;
* `per_residue[i]`: the same ratio restricted to the pairs (i, ·); NaN for a residue with no
  scored pair (absent from the reference, or no reference neighbour within the cutoff);
* `mean_per_residue`: the mean of the finite per-residue scores (a different aggregation, named
  so that nobody mistakes it for the pooled one);
* no superposition is involved; residues missing in the reference (mask 0) are excluded from both
  sides of every pair. A residue present in the reference but missing from the prediction
  (`pred_mask` 0) is not excluded: its pairs are scored 0, since the prediction failed to place it.

Relation to `openfold.utils.loss.lddt` (read from openfold 0.0.1, checked in tests):
it computes distances as `sqrt(eps + |x_i - x_j|²)` and returns
`(eps + Σ scores) / (eps + Σ pairs)` with `eps = 1e-10`, summed over the last axis
(`per_residue=True`) or the last two (`per_residue=False`). So `per_residue=False` is the pooled
global score above up to eps; `per_residue=True` is the per-residue score, except that a residue
with no scored pair gets `eps / eps = 1.0` instead of NaN. Its mask is the reference mask only (no
notion of a missing prediction). The eps under the square root shrinks a distance difference that
sits exactly on a threshold (for example 3.0 Å vs 3.5 Å in float64) just below it, so OpenFold
counts such exact ties as preserved where the strict `<` here does not. Only differences within
about 1e-10 Å of a threshold are affected (and none in float32, where eps vanishes against d²).

`lddt_ca_torch` is the single implementation (batched, any float dtype, any device, no gradients
needed); `lddt_ca` is its numpy entry point for one chain, computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LDDT_THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
"""Distance-difference thresholds in Å (Mariani et al. 2013)."""

LDDT_CUTOFF: float = 15.0
"""Inclusion radius in Å, applied to reference distances."""


@dataclass(frozen=True)
class LddtBatch:
    """LDDT-Cα of a batch of chains (tensors; see the module docstring for the definitions).

    Attributes:
        global_pooled: [B] pooled over all scored pairs of each chain; NaN where a chain has none.
        per_residue: [B, L] per-residue scores; NaN where a residue has no scored pair.
        mean_per_residue: [B] mean of the finite per-residue scores; NaN where there are none.
        n_pairs: [B] number of scored ordered pairs (each unordered pair counts twice, as in
            OpenFold's normaliser).
        score_sum: [B] sum of pair scores over those pairs; `score_sum / n_pairs = global_pooled`,
            and sums over chains give the score pooled over a whole data set.
    """

    global_pooled: torch.Tensor
    per_residue: torch.Tensor
    mean_per_residue: torch.Tensor
    n_pairs: torch.Tensor
    score_sum: torch.Tensor


@dataclass(frozen=True)
class LddtResult:
    """LDDT-Cα of one chain (numpy / Python floats; fields as in `LddtBatch`)."""

    global_pooled: float
    per_residue: np.ndarray
    mean_per_residue: float
    n_pairs: int
    score_sum: float


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    # Explicit differences rather than torch.cdist: cdist's matmul path loses precision, which
    # matters for differences that sit near a threshold.
    return torch.linalg.vector_norm(x[..., :, None, :] - x[..., None, :, :], dim=-1)


@torch.no_grad()
def lddt_ca_torch(
    pred: torch.Tensor,
    ref: torch.Tensor,
    ref_mask: torch.Tensor,
    pred_mask: torch.Tensor | None = None,
    cutoff: float = LDDT_CUTOFF,
    thresholds: tuple[float, ...] = LDDT_THRESHOLDS,
) -> LddtBatch:
    """LDDT-Cα of predicted against reference Cα coordinates, batched.

    Args:
        pred: [B, L, 3] predicted Cα coordinates (Å), residue i paired with reference residue i.
        ref: [B, L, 3] reference Cα coordinates (Å); values where `ref_mask` is 0 are ignored
            (they may be NaN).
        ref_mask: [B, L] 1 where the reference has a Cα, 0 where it is missing or padding.
        pred_mask: [B, L] 1 where the prediction has a Cα; None means everywhere. Pairs touching
            a residue with `pred_mask` 0 (and `ref_mask` 1) score 0.
        cutoff: inclusion radius on reference distances (strict `<`).
        thresholds: distance-difference thresholds (strict `<`).

    Returns:
        `LddtBatch` in the dtype of `pred`, or float32 for half-precision inputs (`n_pairs` as int64).
    """
    if pred.ndim != 3 or pred.shape[-1] != 3 or ref.shape != pred.shape:
        raise ValueError(f"pred and ref must both be [B, L, 3]; got {tuple(pred.shape)} and {tuple(ref.shape)}")
    if ref_mask.shape != pred.shape[:2]:
        raise ValueError(f"ref_mask must be [B, L] = {tuple(pred.shape[:2])}; got {tuple(ref_mask.shape)}")
    if pred_mask is not None and pred_mask.shape != pred.shape[:2]:
        raise ValueError(f"pred_mask must be [B, L] = {tuple(pred.shape[:2])}; got {tuple(pred_mask.shape)}")

    # bf16 / fp16 cannot resolve 0.5 Å at distances of 15 Å: compute in float32 at least.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, ref = pred.to(dtype), ref.to(dtype)
    n = pred.shape[1]
    ref_present = ref_mask.bool()
    d_ref = _pairwise_distances(ref)
    d_pred = _pairwise_distances(pred)
    not_self = ~torch.eye(n, dtype=torch.bool, device=pred.device)
    # NaN reference distances (masked coordinates) compare False, so they never enter `scored`.
    scored = (d_ref < cutoff) & ref_present[:, :, None] & ref_present[:, None, :] & not_self

    diff = (d_pred - d_ref).abs()
    preserved = torch.stack([diff < t for t in thresholds], dim=0).to(pred.dtype).mean(dim=0)
    if pred_mask is not None:
        pred_present = pred_mask.bool()
        preserved = torch.where(pred_present[:, :, None] & pred_present[:, None, :], preserved, 0.0)
    pair_scores = torch.where(scored, preserved, 0.0)

    res_sum = pair_scores.sum(dim=-1)
    res_count = scored.sum(dim=-1)
    nan = torch.tensor(float("nan"), dtype=pred.dtype, device=pred.device)
    per_residue = torch.where(res_count > 0, res_sum / res_count.clamp(min=1), nan)
    score_sum = res_sum.sum(dim=-1)
    n_pairs = res_count.sum(dim=-1)
    global_pooled = torch.where(n_pairs > 0, score_sum / n_pairs.clamp(min=1), nan)
    return LddtBatch(
        global_pooled=global_pooled,
        per_residue=per_residue,
        mean_per_residue=torch.nanmean(per_residue, dim=-1),
        n_pairs=n_pairs,
        score_sum=score_sum,
    )


def lddt_ca(
    pred: np.ndarray,
    ref: np.ndarray,
    ref_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
    cutoff: float = LDDT_CUTOFF,
    thresholds: tuple[float, ...] = LDDT_THRESHOLDS,
) -> LddtResult:
    """LDDT-Cα of one chain from numpy arrays, in float64 (arguments as `lddt_ca_torch`, unbatched).

    Args:
        pred: [L, 3] predicted Cα coordinates, row i paired with reference row i.
        ref: [L, 3] reference Cα coordinates.
        ref_mask: [L] reference presence; None means every residue is present.
        pred_mask: [L] prediction presence; None means every residue is present.
    """
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[-1] != 3 or ref.shape != pred.shape:
        raise ValueError(f"pred and ref must both be [L, 3]; got {pred.shape} and {ref.shape}")
    if ref_mask is None:
        ref_mask = np.ones(len(ref), dtype=bool)

    def batch(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))[None]

    out = lddt_ca_torch(batch(pred), batch(ref), batch(np.asarray(ref_mask)),
                        batch(None if pred_mask is None else np.asarray(pred_mask)),
                        cutoff=cutoff, thresholds=thresholds)
    return LddtResult(
        global_pooled=float(out.global_pooled[0]),
        per_residue=out.per_residue[0].numpy(),
        mean_per_residue=float(out.mean_per_residue[0]),
        n_pairs=int(out.n_pairs[0]),
        score_sum=float(out.score_sum[0]),
    )
