"""Score one predicted chain against its reference chain: pairing, LDDT-Cα, RMSD, GDT-TS, TM-score, pLDDT.

Everything is laid out along the **reference** residues: residue i of every per-residue array is
residue i of the reference chain. A reference residue without a Cα is excluded everywhere; one with
a Cα but no predicted Cα paired to it is scored as missed (its LDDT pairs score 0, it counts in the
GDT-TS / TM-score denominator, it is absent from the RMSD). Predicted residues with no reference
partner are ignored.

A pair whose sequence identity or coverage falls below `MIN_SEQUENCE_IDENTITY` / `MIN_COVERAGE` is
scored but flagged (`low_identity_or_coverage`): the prediction is probably not of that chain, or
covers only part of it, and its scores say little about the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from esmfold_peft.data.structures import Chain
from esmfold_peft.eval.baselines import baseline_scores
from esmfold_peft.eval.lddt import LDDT_CUTOFF, LddtResult, lddt_ca
from esmfold_peft.eval.metrics import SuperpositionScores, superposition_scores
from esmfold_peft.eval.pairing import PairingError, ResiduePairing, pair_residues
from openfold.np import residue_constants

CA = residue_constants.atom_order["CA"]
PLDDT_RANGE = (0.0, 100.0)
# a prediction of the right chain agrees at nearly every paired residue and covers nearly all of it;
# 0.9 still lets through a few mutations or unresolved termini
MIN_SEQUENCE_IDENTITY = 0.9  # identical residues / paired residues
MIN_COVERAGE = 0.9  # paired residues / reference residues


@dataclass(frozen=True)
class ChainScores:
    """Scores of one predicted chain against one reference chain.

    Attributes:
        name: the reference chain's name (file stem + "_" + chain id).
        pred_name: the predicted chain's name.
        ref_file, pred_file: the files the chains came from.
        length: residues in the reference chain (with or without a Cα).
        pred_length: residues in the predicted chain.
        n_ref_with_ca: reference residues with a Cα (the GDT-TS / TM-score denominator).
        scored: bool [length], True where the reference residue has a Cα paired to a predicted Cα.
        pairing: how residues were paired (its `method` is reported).
        lddt: LDDT-Cα (`global_pooled` and `mean_per_residue` are the two aggregations).
        superposition: RMSD (Å), GDT-TS and TM-score (fractions in [0, 1]).
        plddt: float [length], pLDDT (0..100) of the predicted residue paired to each reference
            residue, NaN where none; None when the prediction's B-factors are not pLDDT values.
        residue_labels: author number + insertion code of each reference residue ("52", "52A").
        residue_numbers: int64 [length], author numbers of the reference residues.
        baselines: the sequence-only baselines' scores against the same reference
            (`eval.baselines.baseline_scores`: {"helix": {...}, "compact": {...}}), or None when not computed.
        ptm: the prediction's pTM for this chain when the predictor wrote one (predictions.json), else None.
    """

    name: str
    pred_name: str
    ref_file: str
    pred_file: str
    length: int
    pred_length: int
    n_ref_with_ca: int
    scored: np.ndarray
    pairing: ResiduePairing
    lddt: LddtResult
    superposition: SuperpositionScores
    plddt: np.ndarray | None
    residue_labels: list[str]
    residue_numbers: np.ndarray
    baselines: dict | None = None
    ptm: float | None = None

    @property
    def n_scored(self) -> int:
        """Reference residues with a Cα paired to a predicted Cα."""
        return int(self.scored.sum())

    @property
    def sequence_identity(self) -> float:
        """Fraction of paired residues whose one-letter codes agree."""
        return self.pairing.n_identical / len(self.pairing)

    @property
    def coverage(self) -> float:
        """Fraction of the reference residues paired with a predicted residue."""
        return len(self.pairing) / self.length

    @property
    def low_identity_or_coverage(self) -> bool:
        """Whether the pair falls below `MIN_SEQUENCE_IDENTITY` or `MIN_COVERAGE` (module docstring)."""
        return self.sequence_identity < MIN_SEQUENCE_IDENTITY or self.coverage < MIN_COVERAGE

    def similarity_warning(self) -> str | None:
        """One line on a pair below the identity / coverage thresholds, or None."""
        if not self.low_identity_or_coverage:
            return None
        return (f"{self.name}: {len(self.pairing)} of {self.length} reference residues paired with {self.pred_name} "
                f"(coverage {self.coverage:.2f}), sequence identity {self.sequence_identity:.2f}; below "
                f"{MIN_COVERAGE:g} coverage or {MIN_SEQUENCE_IDENTITY:g} identity, the prediction may not be of "
                "this chain")

    @property
    def mean_plddt(self) -> float | None:
        """Mean pLDDT (0..100) over the scored residues; None without pLDDT."""
        if self.plddt is None:
            return None
        return float(self.plddt[self.scored].mean())


def plddt_from_b_factors(chain: Chain) -> np.ndarray | None:
    """Per-residue pLDDT from the Cα B-factors, or None if they do not look like pLDDT.

    They do when every Cα B-factor lies in [0, 100] and they are not all equal (a constant column,
    e.g. all 0 or all 1, carries no per-residue confidence); a NaN B-factor is none of that. NaN
    where a residue has no Cα.
    """
    has_ca = chain.atom37_mask[:, CA] > 0
    values = chain.b_factors[:, CA].astype(np.float64)
    observed = values[has_ca]
    lo, hi = PLDDT_RANGE
    if len(observed) == 0 or not np.isfinite(observed).all():
        return None
    if observed.min() < lo or observed.max() > hi or np.ptp(observed) == 0:
        return None
    return np.where(has_ca, values, np.nan)


def score_chain(pred: Chain, ref: Chain, lddt_cutoff: float = LDDT_CUTOFF, baselines: bool = True) -> ChainScores:
    """Pair the residues of `pred` and `ref` and compute every metric (see the module docstring), and with
    `baselines` the sequence-only baselines' scores against the same reference.

    Raises PairingError if no reference residue with a Cα is paired to a predicted Cα.
    """
    pairing = pair_residues(pred, ref)
    n = len(ref.sequence)
    ref_ca = ref.atom37_positions[:, CA].astype(np.float64)
    ref_mask = ref.atom37_mask[:, CA] > 0
    pred_ca = np.zeros((n, 3), dtype=np.float64)
    pred_mask = np.zeros(n, dtype=bool)
    pred_ca[pairing.ref_index] = pred.atom37_positions[pairing.pred_index, CA]
    pred_mask[pairing.ref_index] = pred.atom37_mask[pairing.pred_index, CA] > 0
    scored = ref_mask & pred_mask
    if not scored.any():
        raise PairingError(f"{pred.name} vs {ref.name}: no reference Cα is paired with a predicted Cα "
                           f"({len(pairing)} residues paired by {pairing.method})")

    lddt = lddt_ca(pred_ca, ref_ca, ref_mask, pred_mask, cutoff=lddt_cutoff)
    superposition = superposition_scores(pred_ca[scored], ref_ca[scored], n_reference=int(ref_mask.sum()))

    plddt = None
    pred_plddt = plddt_from_b_factors(pred)
    if pred_plddt is not None:
        plddt = np.full(n, np.nan)
        plddt[pairing.ref_index] = pred_plddt[pairing.pred_index]

    return ChainScores(
        name=ref.name,
        pred_name=pred.name,
        ref_file=ref.source,
        pred_file=pred.source,
        length=n,
        pred_length=len(pred.sequence),
        n_ref_with_ca=int(ref_mask.sum()),
        scored=scored,
        pairing=pairing,
        lddt=lddt,
        superposition=superposition,
        plddt=plddt,
        residue_labels=[f"{num}{code}" for num, code in zip(ref.residue_index, ref.insertion_codes)],
        residue_numbers=np.asarray(ref.residue_index, dtype=np.int64),
        baselines=baseline_scores(ref_ca, ref_mask, cutoff=lddt_cutoff) if baselines else None,
    )
