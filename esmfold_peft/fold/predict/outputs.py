"""One batch of sequences through the model: `Prediction`s with their PDB text, pLDDT, pTM without linkers and PAE."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ... import compat  # noqa: F401  (must precede openfold imports)
from ...data.fasta import CHAIN_SEPARATOR
from ..model.esmfold import CA, predicted_atom37
from .inputs import encode_sequences, model_length

from openfold.np import protein as of_protein  # noqa: E402
from openfold.np import residue_constants  # noqa: E402
from openfold.utils.loss import compute_tm  # noqa: E402

PAE_SUFFIX = ".pae.npz"
PAE_MAX_BIN = 31  # the pTM head's bins, as ESMFold and openfold use them


@dataclass(frozen=True)
class Prediction:
    """One predicted structure, linkers removed (L = residues of all chains).

    Attributes:
        sequence: the sequence predicted (20 standard residues and X; a multimer's chains joined by ':').
        chain_index: int [L], 0 for the first chain's residues, 1 for the second's, ...
        atom_positions: float32 [L, 37, 3], Å.
        atom_mask: float32 [L, 37], 1 where the atom is written.
        atom_plddt: float32 [L, 37], each atom's pLDDT in 0..100 (the PDB's B-factors).
        plddt: float32 [L], per-residue (Cα) pLDDT in 0..100.
        ptm: predicted TM-score of the whole complex (linkers left out).
        pae: float32 [L, L], predicted aligned error in Å.
        max_pae: the largest value the aligned-error head can predict, Å.
        seconds: wall time of the batch's forward pass divided by its size (padded sequences cost
            the same, so this is each one's share).
        batch_size: sequences in the batch it was predicted in.
    """

    sequence: str
    chain_index: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    atom_plddt: np.ndarray
    plddt: np.ndarray
    ptm: float
    pae: np.ndarray
    max_pae: float
    seconds: float
    batch_size: int

    @property
    def chains(self) -> list[str]:
        return self.sequence.split(CHAIN_SEPARATOR)

    @property
    def mean_plddt(self) -> float:
        return float(self.plddt.mean())

    @property
    def residue_numbers(self) -> np.ndarray:
        """Each residue's number in its own chain, from 1."""
        return np.concatenate([np.arange(1, len(c) + 1) for c in self.chains])

    @property
    def finite(self) -> bool:
        """Coordinates of written atoms and their pLDDT are all finite."""
        written = self.atom_mask > 0
        return bool(np.isfinite(self.atom_positions[written]).all() and np.isfinite(self.atom_plddt[written]).all()
                    and np.isfinite(self.plddt).all())

    def to_pdb(self, remark: Optional[str] = None) -> str:
        """PDB text: chains A, B, …, each numbered from 1, per-atom pLDDT as B-factors (module docstring)."""
        residues = self.sequence.replace(CHAIN_SEPARATOR, "")
        aatype = np.array([residue_constants.restype_order_with_x[c] for c in residues])
        prot = of_protein.Protein(
            atom_positions=self.atom_positions, aatype=aatype, atom_mask=self.atom_mask,
            residue_index=self.residue_numbers, b_factors=np.clip(self.atom_plddt, 0.0, 100.0),
            chain_index=self.chain_index if len(self.chains) > 1 else None, remark=remark)
        return of_protein.to_pdb(prot)

    def pae_npz(self) -> bytes:
        """The `<stem>.pae.npz` file's bytes (module docstring)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, pae=self.pae.astype(np.float16), chain_index=self.chain_index.astype(np.int8),
                            max_predicted_aligned_error=np.float32(self.max_pae))
        return buffer.getvalue()


def linker_masked_ptm(logits: torch.Tensor, residue_weights: torch.Tensor) -> float:
    """pTM from [L, L, bins] pTM-head logits with openfold's `compute_tm`, residues weighted.

    Weights 0 leave positions (a multimer's linker) out of both the alignment and the scoring and
    out of the length that sets d0; NaN when the logits are not finite (compute_tm would raise).
    """
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float(compute_tm(logits, residue_weights=residue_weights.to(logits), max_bin=PAE_MAX_BIN,
                            no_bins=logits.shape[-1]))


@torch.no_grad()
def predict_sequences(model, sequences: Sequence[str], device: torch.device, num_recycles: int) -> list[Prediction]:
    """Predict a batch of sequences in one forward pass (the model must be in eval mode).

    A multimer (chains separated by ':') is predicted with its chains joined by the linker, which
    is then removed from the results (module docstring).
    """
    encoded = encode_sequences(sequences)
    batch = {k: encoded[k].to(device) for k in ("aatype", "mask", "residue_index")}
    start = time.perf_counter()
    out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=num_recycles)
    atoms = predicted_atom37(out, batch["mask"])
    positions, mask = (t.float().cpu().numpy() for t in atoms)
    atom_plddt = out["plddt"].float().cpu().numpy()
    pae = out["predicted_aligned_error"].float().cpu().numpy()
    max_pae = float(out["max_predicted_aligned_error"].float().max())
    keep = encoded["linker_mask"] > 0
    ptm = [linker_masked_ptm(out["ptm_logits"][i, :n, :n], encoded["linker_mask"][i, :n])
           for i, n in enumerate(model_length(s) for s in sequences)]
    seconds = (time.perf_counter() - start) / len(sequences)  # .cpu() waited for the device
    predictions = []
    for i, seq in enumerate(sequences):
        k = keep[i].numpy()
        predictions.append(Prediction(
            sequence=seq, chain_index=encoded["chain_index"][i][keep[i]].numpy(), atom_positions=positions[i, k],
            atom_mask=mask[i, k], atom_plddt=atom_plddt[i, k], plddt=atom_plddt[i, k, CA], ptm=ptm[i],
            pae=pae[i][np.ix_(k, k)], max_pae=max_pae, seconds=seconds, batch_size=len(sequences)))
    return predictions


