"""The adapter merged into the weights for inference, checked first: merged outputs must equal unmerged ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ...adapters import get_adapter_set, has_adapters
from .inputs import PredictionError
from .outputs import Prediction, predict_sequences

# Merging changes float32 rounding in the LM (~1e-6), which the trunk and recycling amplify: on the
# demo model a 230-residue chain moved by 0.008 Å and 0.01 pLDDT points. A wrong merge moves atoms by Å.
DEFAULT_MERGE_TOLERANCE = 0.05


class MergeMismatchError(PredictionError):
    """Merging the adapter into the language model changed the outputs beyond the tolerance."""


def _max_deviation(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|; an entry non-finite on both sides counts as equal, on one side only as NaN (a mismatch)."""
    if a.size == 0:
        return 0.0
    both_bad = ~np.isfinite(a) & ~np.isfinite(b)
    return float(np.max(np.where(both_bad, 0.0, np.abs(a - b))))


@dataclass(frozen=True)
class MergeCheck:
    """Merged against unmerged outputs on the same sequences.

    Attributes:
        max_position_deviation: Å, over every written atom of every sequence checked.
        max_plddt_deviation: pLDDT points (0..100 scale).
        tolerance: the largest deviation accepted, for both.
        n_sequences: sequences compared.
    """

    max_position_deviation: float
    max_plddt_deviation: float
    tolerance: float
    n_sequences: int

    @property
    def ok(self) -> bool:
        return self.max_position_deviation <= self.tolerance and self.max_plddt_deviation <= self.tolerance

    def as_dict(self) -> dict:
        return {"max_position_deviation_angstrom": self.max_position_deviation,
                "max_plddt_deviation": self.max_plddt_deviation, "tolerance": self.tolerance,
                "n_sequences": self.n_sequences, "ok": self.ok}


def bf16_language_model(model) -> bool:
    return model.esm.embed_tokens.weight.dtype == torch.bfloat16


def adapted_parts(model) -> list:
    """The parts of the folding model that carry adapters: its language model and/or its trunk."""
    return [part for part in (model.esm, model.trunk) if has_adapters(part)]


def merge_adapter_checked(model, sequences: Sequence[str], device: torch.device, num_recycles: int,
                          tolerance: float = DEFAULT_MERGE_TOLERANCE) -> tuple[MergeCheck, list[Prediction]]:
    """Merge the active adapters (language model and trunk) into their weights, checking the outputs on `sequences`.

    Returns the check and the merged model's predictions of `sequences` (so they need not be run
    again). Raises MergeMismatchError, with the deviations, when merging changed the outputs by more
    than `tolerance` (the adapter is then unmerged again).
    """
    adapters = [get_adapter_set(part) for part in adapted_parts(model)]  # the LM's and/or the trunk's
    unmerged = predict_sequences(model, sequences, device, num_recycles)
    for aset in adapters:
        aset.merge()
    merged = predict_sequences(model, sequences, device, num_recycles)
    check = MergeCheck(
        max_position_deviation=max(_max_deviation(u.atom_positions[u.atom_mask > 0], m.atom_positions[m.atom_mask > 0])
                                   for u, m in zip(unmerged, merged)),
        max_plddt_deviation=max(_max_deviation(u.plddt, m.plddt) for u, m in zip(unmerged, merged)),
        tolerance=tolerance, n_sequences=len(sequences))
    if not check.ok:
        for aset in adapters:
            aset.unmerge()
        raise MergeMismatchError(
            f"merging the adapter changed the outputs on {len(sequences)} sequence(s): max deviation "
            f"{check.max_position_deviation:.3g} Å in atom positions and {check.max_plddt_deviation:.3g} in pLDDT, "
            f"tolerance {tolerance:g} (predict with --no-merge to run the adapter unmerged)")
    return check, merged


