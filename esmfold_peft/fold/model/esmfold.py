"""Our ESMFold: fair-esm's folding trunk and heads around an adaptable ESM-2 (docs/method.md §2).

Differences from `esm.esmfold.v1.esmfold.ESMFold`, on purpose:
  * the language model is given (any ESM-2, see `lm.py`), float32 unless `model.lm.storage_dtype`
    stores a frozen one in bf16 (its forward then runs under bf16 autocast, outputs cast to float32);
  * the LM representations are NOT detached: gradients reach the adapter (or the full LM);
  * nothing is downloaded in the constructor;
  * optional activation checkpointing per trunk block (fair-esm's `cpu_grad_checkpoint` flag does
    nothing).
Outputs keep ESMFold's names (frames, positions, angles, distogram, pLDDT, pTM …) so prediction,
losses and evaluation share one model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ... import compat  # fair-esm dataclasses on Python >= 3.11, openfold import order, SM buffers

from esm.esmfold.v1.categorical_mixture import categorical_lddt  # noqa: E402
from esm.esmfold.v1.tri_self_attn_block import TriangularSelfAttentionBlock  # noqa: E402
from esm.esmfold.v1.trunk import FoldingTrunk  # noqa: E402
from openfold.data.data_transforms import make_atom14_masks  # noqa: E402
from openfold.np import residue_constants  # noqa: E402
from openfold.utils.feats import atom14_to_atom37  # noqa: E402
from openfold.utils.loss import compute_predicted_aligned_error, compute_tm  # noqa: E402

CA = residue_constants.atom_order["CA"]  # 1, in atom14 and atom37 alike
STRUCTURE_KEYS = ("s_z", "s_s", "frames", "sidechain_frames", "unnormalized_angles", "angles", "positions", "states")
DISTOGRAM_BINS = 64
LDDT_BINS = 50


class _CheckpointedBlock(TriangularSelfAttentionBlock):
    """A trunk block that recomputes its activations in backward (same parameters and names)."""

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


def trunk_kwargs(trunk_cfg) -> dict:
    """fair-esm's FoldingTrunk wants plain keyword arguments with a structure-module mapping."""
    d = trunk_cfg.to_dict() if hasattr(trunk_cfg, "to_dict") else dict(trunk_cfg)
    d["structure_module"] = dict(d["structure_module"])
    return d


def predicted_atom37(out: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, L, 37, 3], atom mask [B, L, 37]) of the final structure.

    From the structure module's atom14 positions (as ESMFold writes them), except that X residues,
    for which openfold places no atom at all, get a Cα at the origin of their predicted backbone
    frame (for the 20 standard residues that origin is exactly the predicted Cα).
    """
    aatype = out["aatype"]
    feats = make_atom14_masks({"aatype": aatype})
    positions = atom14_to_atom37(out["positions"][-1], feats)
    atom_mask = feats["atom37_atom_exists"] * mask[..., None]
    unknown = (aatype == residue_constants.restype_num) & (mask > 0)
    origins = out["frames"][-1][..., 4:].to(positions.dtype)
    positions[..., CA, :] = torch.where(unknown[..., None], origins, positions[..., CA, :])
    atom_mask[..., CA] = torch.where(unknown, torch.ones_like(atom_mask[..., CA]), atom_mask[..., CA])
    return positions, atom_mask


def _ptm(logits: torch.Tensor) -> torch.Tensor:
    """pTM of one chain; NaN for non-finite logits (openfold's compute_tm would raise on them)."""
    if not bool(torch.isfinite(logits).all()):
        return logits.new_tensor(float("nan"))
    return compute_tm(logits[None], max_bins=31, no_bins=DISTOGRAM_BINS)


class AdaptedESMFold(nn.Module):
    def __init__(self, lm: nn.Module, alphabet, trunk_cfg, lddt_head_hid_dim: int = 128,
                 checkpoint_blocks: bool = False):
        super().__init__()
        self.esm = lm
        self.esm_dict = alphabet
        self.esm_feats = lm.embed_dim
        self.register_buffer("af2_to_esm", self._af2_to_esm(alphabet), persistent=False)
        self.esm_s_combine = nn.Parameter(torch.zeros(lm.num_layers + 1))

        self.trunk = FoldingTrunk(**trunk_kwargs(trunk_cfg))
        c_s = self.trunk.cfg.sequence_state_dim
        c_z = self.trunk.cfg.pairwise_state_dim
        self.c_z = c_z
        self.esm_s_mlp = nn.Sequential(nn.LayerNorm(self.esm_feats), nn.Linear(self.esm_feats, c_s), nn.ReLU(),
                                       nn.Linear(c_s, c_s))
        # 0 is padding, N is unknown residues, N + 1 is mask (as ESMFold)
        self.n_tokens_embed = residue_constants.restype_num + 3
        self.embedding = nn.Embedding(self.n_tokens_embed, c_s, padding_idx=0)
        self.distogram_head = nn.Linear(c_z, DISTOGRAM_BINS)
        self.ptm_head = nn.Linear(c_z, DISTOGRAM_BINS)
        self.lm_head = nn.Linear(c_s, self.n_tokens_embed)
        sm_c_s = self.trunk.structure_module.c_s
        self.lddt_head = nn.Sequential(nn.LayerNorm(sm_c_s), nn.Linear(sm_c_s, lddt_head_hid_dim),
                                       nn.Linear(lddt_head_hid_dim, lddt_head_hid_dim),
                                       nn.Linear(lddt_head_hid_dim, 37 * LDDT_BINS))
        compat.init_structure_module_buffers(self.trunk.structure_module)
        if checkpoint_blocks:
            for block in self.trunk.blocks:
                block.__class__ = _CheckpointedBlock

    @staticmethod
    def _af2_to_esm(d) -> torch.Tensor:
        # index 0 is padding; openfold restypes (with X) are shifted by one
        return torch.tensor([d.padding_idx] + [d.get_idx(v) for v in residue_constants.restypes_with_x])

    def language_model_representations(self, aatype: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-layer ESM-2 representations B×L×(layers+1)×d, with bos/eos added and removed."""
        esmaa = self.af2_to_esm[(aatype + 1).masked_fill(mask != 1, 0)]
        B = esmaa.shape[0]
        d = self.esm_dict
        bos = esmaa.new_full((B, 1), d.cls_idx)
        eos = esmaa.new_full((B, 1), d.padding_idx)
        esmaa = torch.cat([bos, esmaa, eos], dim=1)
        esmaa[torch.arange(B, device=esmaa.device), (esmaa != d.padding_idx).sum(1)] = d.eos_idx
        from .lm import lm_autocast  # frozen-LM storage dtype (model.lm.storage_dtype): bf16 LM under autocast

        with lm_autocast(self.esm, esmaa.device.type):  # a float32 LM: no autocast of its own
            res = self.esm(esmaa, repr_layers=range(self.esm.num_layers + 1), need_head_weights=False)
        esm_s = torch.stack([v for _, v in sorted(res["representations"].items())], dim=2)
        return esm_s[:, 1:-1]

    def forward(self, aatype: torch.Tensor, mask: Optional[torch.Tensor] = None,
                residue_index: Optional[torch.Tensor] = None, num_recycles: Optional[int] = None) -> dict:
        """aatype: B×L openfold residue types (X = 20); mask: B×L; residue_index: B×L (gaps allowed).

        `num_recycles` extra trunk passes (0 = a single pass), gradients through the last only.
        """
        if mask is None:
            mask = torch.ones_like(aatype)
        B, L = aatype.shape
        if residue_index is None:
            residue_index = torch.arange(L, device=aatype.device).expand_as(aatype)
        residue_index = residue_index.long()

        esm_s = self.language_model_representations(aatype, mask).to(self.esm_s_combine.dtype)
        esm_s = (self.esm_s_combine.softmax(0).unsqueeze(0) @ esm_s).squeeze(2)
        s_s_0 = self.esm_s_mlp(esm_s) + self.embedding(aatype)
        s_z_0 = s_s_0.new_zeros(B, L, L, self.c_z)

        structure = self.trunk(s_s_0, s_z_0, aatype, residue_index, mask, no_recycles=num_recycles)
        out = {k: v for k, v in structure.items() if k in STRUCTURE_KEYS}

        disto = self.distogram_head(out["s_z"])
        out["distogram_logits"] = (disto + disto.transpose(1, 2)) / 2
        out["lm_logits"] = self.lm_head(out["s_s"])
        out["aatype"] = aatype
        make_atom14_masks(out)
        for k in ("atom14_atom_exists", "atom37_atom_exists"):
            out[k] = out[k] * mask.unsqueeze(-1)
        out["residue_index"] = residue_index

        lddt_head = self.lddt_head(out["states"]).reshape(out["states"].shape[0], B, L, -1, LDDT_BINS)
        out["lddt_head"] = lddt_head
        out["plddt"] = 100 * categorical_lddt(lddt_head[-1], bins=LDDT_BINS)
        ptm_logits = self.ptm_head(out["s_z"])
        out["ptm_logits"] = ptm_logits
        seqlen = mask.long().sum(1)
        out["ptm"] = torch.stack([_ptm(lg[:n, :n]) for lg, n in zip(ptm_logits, seqlen)])
        out.update(compute_predicted_aligned_error(ptm_logits, max_bin=31, no_bins=DISTOGRAM_BINS))
        return out
