"""One batch of sequences through the model: `Prediction`s with their PDB text, pLDDT, pTM without linkers (the
whole complex's, each chain's, and the interface's) and PAE.

A `Prediction` holds what the heads output, trained or not; what of it is written, and how, follows
the heads' provenance (`confidence`): `to_pdb` takes the pLDDT convention.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ... import compat  # noqa: F401  (must precede openfold imports)
from ...data.fasta import CHAIN_SEPARATOR
from ..model.esmfold import CA, predicted_atom37
from ..run.confidence import CA_ONLY, PDB_REMARKS, PER_ATOM
from .inputs import encode_sequences, model_length

from openfold.np import protein as of_protein  # noqa: E402
from openfold.np import residue_constants  # noqa: E402
from openfold.utils.loss import _calculate_bin_centers, compute_tm  # noqa: E402  (the bins compute_tm uses)

PAE_SUFFIX = ".pae.npz"
PAE_JSON_SUFFIX = ".pae.json"  # the same PAE in AlphaFold DB's JSON format
STRUCTURE_FORMATS = ("pdb", "cif")
PAE_MAX_BIN = 31  # the pTM head's bins, as ESMFold and openfold use them


@dataclass(frozen=True)
class Prediction:
    """One predicted structure, linkers removed (L = residues of all chains).

    Attributes:
        sequence: the sequence predicted (20 standard residues and X; a multimer's chains joined by ':').
        chain_index: int [L], 0 for the first chain's residues, 1 for the second's, ...
        atom_positions: float32 [L, 37, 3], Å.
        atom_mask: float32 [L, 37], 1 where the atom is written.
        atom_plddt: float32 [L, 37], each atom's pLDDT in 0..100, the lDDT head's 37 channels (the PDB's
            B-factors for a head trained per atom; see `b_factors`).
        plddt: float32 [L], per-residue (Cα) pLDDT in 0..100.
        ptm: predicted TM-score of the whole complex (linkers left out).
        ptm_per_chain: pTM of each chain alone (openfold's `compute_tm` weighted to that chain's residues:
            aligned on, scored over, and d0 from that chain only); for a monomer, (ptm,).
        iptm: interface pTM of a multimer (`interface_ptm`); None for a monomer.
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
    ptm_per_chain: tuple[float, ...] = ()
    iptm: Optional[float] = None

    @property
    def chains(self) -> list[str]:
        return self.sequence.split(CHAIN_SEPARATOR)

    @property
    def mean_plddt(self) -> float:
        """The mean over residues of the Cα pLDDT (0..100): `mean_plddt` in the JSON files, and the one definition
        of it. esm-fold's own printout averages the B-factors over all atoms present instead; the two differ
        for a model whose lDDT head predicts per atom (fair-esm's), and agree for a head trained on Cα only."""
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

    def b_factors(self, plddt_head: Optional[str]) -> np.ndarray:
        """float32 [L, 37], the PDB's B-factors for a lDDT head trained per atom (PER_ATOM: each atom's own
        pLDDT), on Cα only (CA_ONLY: the residue's Cα pLDDT on all of its atoms) or never (None: zeros)."""
        if plddt_head == PER_ATOM:
            values = self.atom_plddt
        elif plddt_head == CA_ONLY:
            values = np.broadcast_to(self.plddt[:, None], self.atom_plddt.shape)
        elif plddt_head is None:
            values = np.zeros_like(self.atom_plddt)
        else:
            raise ValueError(f"unknown pLDDT head {plddt_head!r} (expected {PER_ATOM!r}, {CA_ONLY!r} or None)")
        return np.clip(values, 0.0, 100.0).astype(np.float32)

    def to_pdb(self, plddt_head: Optional[str], remark: Optional[str] = None) -> str:
        """PDB text: chains A, B, …, each numbered from 1, B-factors as `b_factors(plddt_head)`, and REMARK
        lines: `remark` (e.g. the record id), then what the B-factors are (module docstring of the package)."""
        residues = self.sequence.replace(CHAIN_SEPARATOR, "")
        aatype = np.array([residue_constants.restype_order_with_x[c] for c in residues])
        remarks = ([remark] if remark else []) + list(PDB_REMARKS[plddt_head])
        prot = of_protein.Protein(
            atom_positions=self.atom_positions, aatype=aatype, atom_mask=self.atom_mask,
            residue_index=self.residue_numbers, b_factors=self.b_factors(plddt_head),
            chain_index=self.chain_index if len(self.chains) > 1 else None,
            remark="\nREMARK ".join(remarks))  # openfold writes one "REMARK " line: one per line here
        return of_protein.to_pdb(prot)

    def pae_npz(self) -> bytes:
        """The `<stem>.pae.npz` file's bytes (module docstring)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, pae=self.pae.astype(np.float16), chain_index=self.chain_index.astype(np.int8),
                            max_predicted_aligned_error=np.float32(self.max_pae))
        return buffer.getvalue()

    def pae_json(self) -> str:
        """The `<stem>.pae.json` file's text: the PAE as AlphaFold DB writes it, `[{"predicted_aligned_error":
        [[...]], "max_predicted_aligned_error": 31.75}]`, values in Å rounded to 2 decimals (rows and columns as
        in `pae_npz`)."""
        pae = np.round(self.pae.astype(np.float64), 2).tolist()  # float64: 0.25 stays 0.25 in the text
        return json.dumps([{"predicted_aligned_error": pae,
                            "max_predicted_aligned_error": round(float(self.max_pae), 2)}], separators=(",", ":"))


def pdb_to_mmcif(pdb: str, name: str) -> str:
    """mmCIF text of PDB text (Biopython's PDBParser and MMCIFIO): the same atoms, coordinates, B-factors and chain
    ids; the PDB's REMARK lines are kept as comment lines after `data_<name>` (`name`: no whitespace)."""
    from Bio.PDB import MMCIFIO, PDBParser

    structure = PDBParser(QUIET=True).get_structure(name, io.StringIO(pdb))
    writer = MMCIFIO()
    writer.set_structure(structure)
    buffer = io.StringIO()
    writer.save(buffer)
    head, _, rest = buffer.getvalue().partition("\n")
    comments = "".join(f"# {line[6:].strip()}\n" for line in pdb.splitlines() if line.startswith("REMARK"))
    return f"{head}\n{comments}{rest}"


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


def interface_ptm(logits: torch.Tensor, chain_index: torch.Tensor, max_bin: int = PAE_MAX_BIN) -> Optional[float]:
    """ipTM, AF-multimer's interface pTM, from [L, L, bins] pTM-head logits; None with fewer than two chains.

    `chain_index` [L]: each position's chain (0, 1, …; -1 leaves a position out, e.g. a linker). For
    each residue i aligned on, the expected TM term of the residues j of the *other* chains, averaged
    over them; ipTM is the largest such average over i. d0 is set by the whole complex's length
    (residues of all chains, clipped below at 19 as pTM's), and the bins are those of `compute_tm`:
    the TM term of a pair is Σ_b p_ij(b) / (1 + (c_b / d0)²), c_b openfold's bin centres (0.25, 0.75,
    …, 31.25, 31.75 Å for 64 bins up to 31 Å). NaN when the logits are not finite.
    """
    chain_index = chain_index.to(logits.device)
    if len(set(chain_index[chain_index >= 0].tolist())) < 2:
        return None
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    weights = (chain_index >= 0).to(logits)
    boundaries = torch.linspace(0, max_bin, steps=logits.shape[-1] - 1, device=logits.device)
    centres = _calculate_bin_centers(boundaries)  # compute_tm's own bins
    n = max(float(weights.sum()), 19.0)
    d0 = 1.24 * (n - 15) ** (1.0 / 3) - 1.8
    term = (torch.softmax(logits, dim=-1) / (1 + (centres / d0) ** 2)).sum(-1)  # [L, L], expected TM term
    pairs = weights[:, None] * weights[None, :] * (chain_index[:, None] != chain_index[None, :]).to(logits)
    per_alignment = (term * pairs).sum(-1) / (pairs.sum(-1) + 1e-8)
    return float(per_alignment[weights > 0].max())


def chain_ptms(logits: torch.Tensor, chain_index: torch.Tensor) -> tuple[float, ...]:
    """pTM of each chain alone: `linker_masked_ptm` weighted to that chain's residues (chain_index [L] as in
    `interface_ptm`)."""
    chains = sorted(set(chain_index[chain_index >= 0].tolist()))
    return tuple(linker_masked_ptm(logits, (chain_index == c).float()) for c in chains)


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
    lengths = [model_length(s) for s in sequences]
    ptm = [linker_masked_ptm(out["ptm_logits"][i, :n, :n], encoded["linker_mask"][i, :n])
           for i, n in enumerate(lengths)]
    seconds = (time.perf_counter() - start) / len(sequences)  # .cpu() waited for the device
    chains = [(out["ptm_logits"][i, :n, :n], encoded["chain_index"][i, :n]) for i, n in enumerate(lengths)]
    per_chain = [chain_ptms(logits, index) for logits, index in chains]
    iptm = [interface_ptm(logits, index) for logits, index in chains]
    predictions = []
    for i, seq in enumerate(sequences):
        k = keep[i].numpy()
        predictions.append(Prediction(
            sequence=seq, chain_index=encoded["chain_index"][i][keep[i]].numpy(), atom_positions=positions[i, k],
            atom_mask=mask[i, k], atom_plddt=atom_plddt[i, k], plddt=atom_plddt[i, k, CA], ptm=ptm[i],
            pae=pae[i][np.ix_(k, k)], max_pae=max_pae, seconds=seconds, batch_size=len(sequences),
            ptm_per_chain=per_chain[i], iptm=iptm[i]))
    return predictions


