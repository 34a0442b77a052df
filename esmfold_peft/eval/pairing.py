"""Which predicted chain and residue goes with which reference chain and residue.

Chains: if both files hold exactly one chain, they are paired whatever their ids (a prediction is
often written as chain A whatever the reference calls it); otherwise by chain id, then by chain
name for reference chains whose id has no counterpart.

Residues (`pair_residues`), in order of preference:

* `"residue_number"`: by author residue number + insertion code, used when every residue number
  the two chains share carries the same amino acid ('X' matches anything) and numbering pairs at
  least as many identical residues as the alignment below would (so a prediction renumbered from 1
  against a reference starting at 20 is not paired by number just because a few letters happen to
  coincide);
* `"alignment"`: otherwise, by a global alignment of the two sequences with Biopython's
  `PairwiseAligner` (BLOSUM62, gap open -10, extend -0.5, end gaps free, so a reference covering
  part of the predicted sequence aligns without penalty). Aligned residues are paired even where
  their letters differ; `n_identical` says how many agree.

Reference residues without a partner stay in the evaluation (a prediction that misses them is
wrong there); predicted residues without a reference partner are ignored (never counted wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from Bio import Align
from Bio.Align import substitution_matrices

from esmfold_peft.data.structures import Chain

RESIDUE_NUMBER = "residue_number"
ALIGNMENT = "alignment"


class PairingError(ValueError):
    """Chains or residues that cannot be paired; the message says which and why."""


@dataclass(frozen=True)
class ResiduePairing:
    """Residue correspondence between a predicted and a reference chain.

    Attributes:
        ref_index: int64 [K] indices into the reference chain's residues.
        pred_index: int64 [K] indices into the predicted chain's residues (same order).
        method: `"residue_number"` or `"alignment"`.
        n_identical: paired residues with the same one-letter code.
    """

    ref_index: np.ndarray
    pred_index: np.ndarray
    method: str
    n_identical: int

    def __len__(self) -> int:
        return len(self.ref_index)


def pair_chains(pred_chains: Sequence[Chain], ref_chains: Sequence[Chain]) -> tuple[list[tuple[Chain, Chain]], list[str]]:
    """Pair predicted with reference chains.

    Returns `(pairs, problems)`: `(pred, ref)` pairs in reference order, and one message per
    reference chain that has no predicted counterpart. Predicted chains with no reference
    counterpart are ignored.
    """
    if len(pred_chains) == 1 and len(ref_chains) == 1:
        return [(pred_chains[0], ref_chains[0])], []
    by_id = {c.chain_id: c for c in pred_chains}
    by_name = {c.name: c for c in pred_chains}
    pairs, problems = [], []
    for ref in ref_chains:
        pred = by_id.get(ref.chain_id)
        if pred is None:
            pred = by_name.get(ref.name)
        if pred is None:
            available = ", ".join(repr(c.chain_id) for c in pred_chains)
            problems.append(f"reference chain {ref.chain_id!r} ({ref.name}) has no predicted chain with "
                            f"the same id or name (predicted chains: {available})")
        else:
            pairs.append((pred, ref))
    return pairs, problems


def _residue_keys(chain: Chain) -> list[tuple[int, str]]:
    return [(int(n), code) for n, code in zip(chain.residue_index, chain.insertion_codes)]


def _letters_agree(a: str, b: str) -> bool:
    return a == b or a == "X" or b == "X"


def _pair_by_number(pred: Chain, ref: Chain) -> ResiduePairing | None:
    """Pairing by residue number + insertion code, or None if the sequences disagree under it."""
    pred_keys, ref_keys = _residue_keys(pred), _residue_keys(ref)
    pred_at = {key: i for i, key in enumerate(pred_keys)}
    if len(pred_at) != len(pred_keys) or len(set(ref_keys)) != len(ref_keys):
        return None  # duplicated numbering: numbers do not identify residues
    ref_index, pred_index = [], []
    for i, key in enumerate(ref_keys):
        j = pred_at.get(key)
        if j is None:
            continue
        if not _letters_agree(ref.sequence[i], pred.sequence[j]):
            return None
        ref_index.append(i)
        pred_index.append(j)
    if not ref_index:
        return None
    n_identical = sum(ref.sequence[i] == pred.sequence[j] for i, j in zip(ref_index, pred_index))
    return ResiduePairing(np.array(ref_index, dtype=np.int64), np.array(pred_index, dtype=np.int64),
                          RESIDUE_NUMBER, n_identical)


@lru_cache(maxsize=1)
def _aligner() -> Align.PairwiseAligner:
    return Align.PairwiseAligner(
        mode="global",
        substitution_matrix=substitution_matrices.load("BLOSUM62"),
        open_gap_score=-10.0,
        extend_gap_score=-0.5,
        end_gap_score=0.0,
    )


def _pair_by_alignment(pred: Chain, ref: Chain) -> ResiduePairing:
    aligner = _aligner()
    alphabet = set(aligner.substitution_matrix.alphabet)

    def clean(seq: str) -> str:
        return "".join(c if c in alphabet else "X" for c in seq.upper())

    alignment = aligner.align(clean(ref.sequence), clean(pred.sequence))[0]
    ref_index, pred_index = [], []
    for (r0, r1), (p0, p1) in zip(*alignment.aligned):
        ref_index.extend(range(r0, r1))
        pred_index.extend(range(p0, p1))
    n_identical = sum(ref.sequence[i] == pred.sequence[j] for i, j in zip(ref_index, pred_index))
    return ResiduePairing(np.array(ref_index, dtype=np.int64), np.array(pred_index, dtype=np.int64),
                          ALIGNMENT, n_identical)


def pair_residues(pred: Chain, ref: Chain) -> ResiduePairing:
    """Pair the residues of a predicted and a reference chain (rules in the module docstring).

    Raises PairingError if either chain is empty or no residue can be paired.
    """
    if len(pred.sequence) == 0 or len(ref.sequence) == 0:
        raise PairingError(f"cannot pair {pred.name} with {ref.name}: a chain has no residues")
    by_alignment = _pair_by_alignment(pred, ref)
    by_number = _pair_by_number(pred, ref)
    if by_number is not None and by_number.n_identical >= by_alignment.n_identical:
        return by_number
    if len(by_alignment) == 0:
        raise PairingError(f"cannot pair {pred.name} with {ref.name}: the sequences do not align")
    return by_alignment
