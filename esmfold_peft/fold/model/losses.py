"""The explicit loss subset of docs/method.md §2, built from `openfold.utils.loss` functions.

OpenFold's `AlphaFoldLoss` always runs MSA and violation terms and silently replaces a non-finite
term by zero; here every term is named, weighted by the config, logged, and a non-finite total is
left non-finite so the trainer can stop and say the run diverged.

    total = w_fape·FAPE(backbone, side chains; clamped with probability p) + w_chi·chi
            + w_disto·distogram + w_plddt·pLDDT-Cα [+ w_tm·pTM]          (× √min(L, crop) as AF2 §1.9)
"""

from __future__ import annotations

from typing import Dict, Tuple

import ml_collections as mlc
import torch

from ... import compat  # noqa: F401
from .esmfold import CA, predicted_atom37

from openfold.utils.loss import (compute_renamed_ground_truth, distogram_loss, fape_loss,  # noqa: E402
                                 lddt_loss, supervised_chi_loss, tm_loss)



def default_loss_config() -> mlc.ConfigDict:
    """AF2 / OpenFold initial-training weights for the terms ESMFold trains with."""
    return mlc.ConfigDict({
        "fape": {"weight": 1.0, "clamp_prob": 0.9, "eps": 1e-4,
                 "backbone": {"clamp_distance": 10.0, "loss_unit_distance": 10.0, "weight": 0.5},
                 "sidechain": {"clamp_distance": 10.0, "length_scale": 10.0, "weight": 0.5}},
        "supervised_chi": {"weight": 1.0, "chi_weight": 0.5, "angle_norm_weight": 0.01, "eps": 1e-6},
        "distogram": {"weight": 0.3, "min_bin": 2.3125, "max_bin": 21.6875, "no_bins": 64, "eps": 1e-6},
        "plddt": {"weight": 0.01, "cutoff": 15.0, "no_bins": 50, "min_resolution": 0.1,
                  "max_resolution": 3.0, "eps": 1e-10},
        "tm": {"weight": 0.0, "max_bin": 31, "no_bins": 64, "min_resolution": 0.1, "max_resolution": 3.0,
               "eps": 1e-8},
        "scale_by_length": True,
    })


def fold_loss(out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], cfg: mlc.ConfigDict,
              ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(total loss, {term: value}) for one batch; `batch["use_clamped_fape"]` is B floats in {0,1}."""
    batch = dict(batch)
    positions = out["positions"][-1]
    batch.update(compute_renamed_ground_truth(batch, positions))
    sm = {"frames": out["frames"], "sidechain_frames": out["sidechain_frames"], "positions": out["positions"]}
    terms: Dict[str, torch.Tensor] = {}

    fape_cfg = mlc.ConfigDict({"backbone": {**cfg.fape.backbone, "eps": cfg.fape.eps},
                               "sidechain": {**cfg.fape.sidechain, "eps": cfg.fape.eps}})
    terms["fape"] = fape_loss({"sm": sm}, batch, fape_cfg)
    terms["supervised_chi"] = supervised_chi_loss(
        out["angles"], out["unnormalized_angles"], **{**batch, **_kw(cfg.supervised_chi)})
    terms["distogram"] = distogram_loss(logits=out["distogram_logits"], **{**batch, **_kw(cfg.distogram)})
    if cfg.plddt.weight:
        atom37 = predicted_atom37(out, batch["seq_mask"])[0]
        terms["plddt"] = lddt_loss(logits=out["lddt_head"][-1][..., CA, :], all_atom_pred_pos=atom37,
                                   **{**batch, **_kw(cfg.plddt)})
    if cfg.tm.weight:
        terms["tm"] = tm_loss(logits=out["ptm_logits"], final_affine_tensor=out["frames"][-1],
                              **{**batch, **_kw(cfg.tm)})

    total = sum(cfg[name].weight * value for name, value in terms.items())
    if cfg.scale_by_length:
        seq_len = batch["seq_mask"].sum(-1).float().mean()
        total = total * torch.sqrt(torch.clamp(seq_len, max=float(batch["aatype"].shape[-1])))
    logged = {name: float(value.detach()) for name, value in terms.items()}
    logged["loss"] = float(total.detach())
    return total, logged


def _kw(section: mlc.ConfigDict) -> dict:
    return {k: v for k, v in section.items() if k != "weight"}
