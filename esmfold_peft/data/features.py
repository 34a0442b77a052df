"""Chains in, training features out: OpenFold's targets, cropping, padding and batching.

Feature names are the ones `openfold.utils.loss` reads, so a batch can be passed to its loss
functions as keyword arguments. Every feature is per residue (first dimension L) except
`resolution`, a 0-d tensor per chain ([B] in a batch).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from openfold.data import data_transforms as dt

from esmfold_peft.data.structures import Chain

Features = dict[str, torch.Tensor]

# The keys `chain_to_features` produces, and their dtypes.
FEATURE_DTYPES: dict[str, torch.dtype] = {
    "aatype": torch.int64,
    "seq_mask": torch.float32,
    "residue_index": torch.int64,
    "all_atom_positions": torch.float32,
    "all_atom_mask": torch.float32,
    "atom14_atom_exists": torch.float32,
    "atom14_gt_exists": torch.float32,
    "atom14_gt_positions": torch.float32,
    "atom14_alt_gt_positions": torch.float32,
    "atom14_alt_gt_exists": torch.float32,
    "atom14_atom_is_ambiguous": torch.float32,
    "residx_atom14_to_atom37": torch.int64,
    "residx_atom37_to_atom14": torch.int64,
    "atom37_atom_exists": torch.float32,
    "rigidgroups_gt_frames": torch.float32,
    "rigidgroups_gt_exists": torch.float32,
    "rigidgroups_group_exists": torch.float32,
    "rigidgroups_group_is_ambiguous": torch.float32,
    "rigidgroups_alt_gt_frames": torch.float32,
    "pseudo_beta": torch.float32,
    "pseudo_beta_mask": torch.float32,
    "backbone_rigid_tensor": torch.float32,
    "backbone_rigid_mask": torch.float32,
    "chi_angles_sin_cos": torch.float32,
    "chi_mask": torch.float32,
    "resolution": torch.float32,
}


def model_residue_index(author_numbers: np.ndarray) -> np.ndarray:
    """0-based positions that keep gaps in the author numbering and always increase.

    p[i] = max(a[i] - a[0], p[i-1] + 1): a residue with an insertion code (a repeated author number)
    or a numbering that goes backwards takes the next position, and everything after it shifts.
    """
    a = np.asarray(author_numbers, dtype=np.int64)
    if a.size == 0:
        return a.copy()
    steps = np.arange(a.size, dtype=np.int64)
    return np.maximum.accumulate(a - a[0] - steps) + steps


def chain_to_features(chain: Chain, unknown_resolution: float = 0.0) -> Features:
    """OpenFold training targets for one chain (keys and dtypes: FEATURE_DTYPES).

    An unknown resolution (nan) becomes `unknown_resolution`; OpenFold uses 0 for PDB inputs,
    which switches the resolution-gated losses (pLDDT, pTM: 0.1-3 Å) off for that chain.
    """
    protein = {
        "aatype": torch.from_numpy(chain.aatype.astype(np.int64)),
        "all_atom_positions": torch.from_numpy(chain.atom37_positions.astype(np.float32)),
        "all_atom_mask": torch.from_numpy(chain.atom37_mask.astype(np.float32)),
    }
    protein = dt.make_seq_mask(protein)
    protein = dt.make_atom14_masks(protein)
    protein = dt.make_atom14_positions(protein)
    protein = dt.atom37_to_frames(protein)
    protein.update(_chi_angles(protein))
    protein = dt.make_pseudo_beta("")(protein)
    protein = dt.get_backbone_frames(protein)

    resolution = chain.resolution if math.isfinite(chain.resolution) else unknown_resolution
    protein["residue_index"] = torch.from_numpy(model_residue_index(chain.residue_index))
    protein["resolution"] = torch.tensor(resolution, dtype=torch.float32)
    return {key: protein[key].to(dtype) for key, dtype in FEATURE_DTYPES.items()}


def _chi_angles(protein: Features) -> Features:
    """chi_angles_sin_cos / chi_mask; torsions are computed in float64 (they are precision-sensitive)."""
    double = {
        "aatype": protein["aatype"],
        "all_atom_positions": protein["all_atom_positions"].double(),
        "all_atom_mask": protein["all_atom_mask"].double(),
    }
    double = dt.get_chi_angles(dt.atom37_to_torsion_angles("")(double))
    return {"chi_angles_sin_cos": double["chi_angles_sin_cos"].float(),
            "chi_mask": double["chi_mask"].float()}


def num_residues(features: Features) -> int:
    """L, the number of residues (padding included)."""
    return int(features["aatype"].shape[0])


def crop(features: Features, crop_size: int, generator: torch.Generator) -> Features:
    """A random contiguous window of `crop_size` residues (the same one for every feature).

    Chains of at most `crop_size` residues come back unchanged; the window start is drawn from
    `generator`, so a seeded generator gives the same crop every time.
    """
    length = num_residues(features)
    if length <= crop_size:
        return features
    start = int(torch.randint(0, length - crop_size + 1, (1,), generator=generator))
    return {k: (v if v.dim() == 0 else v[start:start + crop_size]) for k, v in features.items()}


def pad_to(features: Features, length: int) -> Features:
    """Zero-pad every per-residue feature to `length` residues (padding has seq_mask 0)."""
    current = num_residues(features)
    if length < current:
        raise ValueError(f"cannot pad {current} residues to a shorter length {length}")
    if length == current:
        return features
    padded = {}
    for key, value in features.items():
        if value.dim() == 0:
            padded[key] = value
        else:
            pad = value.new_zeros((length - current, *value.shape[1:]))
            padded[key] = torch.cat([value, pad], dim=0)
    return padded


def collate(batch: Sequence[Features]) -> Features:
    """Stack features padded to the longest chain; adds `mask` [B, L] (= seq_mask, 0 on padding)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    length = max(num_residues(f) for f in batch)
    padded = [pad_to(f, length) for f in batch]
    out = {key: torch.stack([f[key] for f in padded]) for key in padded[0]}
    out["mask"] = out["seq_mask"].clone()
    return out
