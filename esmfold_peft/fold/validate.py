"""Validation LDDT-Cα of a folding model on a data split (docs/method.md §4), used by training and evaluation.

The headline number is OpenFold's: the pooled LDDT-Cα of each chain, averaged over chains
(`lddt_ca`). Also reported: the score pooled over every scored pair of the split
(`lddt_ca_pooled_all`) and the mean of per-residue scores (`lddt_ca_mean_per_residue`).
"""

from __future__ import annotations

import math

import torch

from ..data.features import collate
from ..eval.baselines import baseline_scores, mean_baselines
from ..eval.lddt import lddt_ca_torch
from ..runtime.progress import Progress
from ..runtime.session import autocast_for
from .model.esmfold import CA, predicted_atom37



@torch.no_grad()
def validate(model, dataset, device: torch.device, num_recycles: int = 3, bf16: bool = False,
             max_chains: int = 0, progress: bool = False, keep_outputs: bool = False) -> dict:
    """Predict every chain of `dataset` (a ChainDataset) and score it against its structure."""
    was_training = model.training
    model.eval()
    n = len(dataset) if not max_chains else min(max_chains, len(dataset))
    chains, outputs = [], []
    try:
        for i in Progress.over(range(n), "validation", enabled=progress, unit="chain", leave=False, every=60.0):
            feats = dataset[i]
            batch = {k: v.to(device) for k, v in collate([feats]).items()}
            with autocast_for(device, bf16):
                out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=num_recycles)
            atom37, atom37_mask = predicted_atom37(out, batch["mask"])
            pred = atom37[..., CA, :].float()
            ref = batch["all_atom_positions"][..., CA, :].float()
            res = lddt_ca_torch(pred, ref, batch["all_atom_mask"][..., CA])
            plddt = out["plddt"][..., CA].float()
            mask = batch["mask"]
            chains.append({
                "name": dataset.name(i),
                "length": int(mask.sum()),
                "lddt_ca": float(res.global_pooled[0]),
                "lddt_ca_mean_per_residue": float(res.mean_per_residue[0]),
                "n_pairs": int(res.n_pairs[0]),
                "score_sum": float(res.score_sum[0]),
                "mean_plddt": float((plddt * mask).sum() / mask.sum()),
                "ptm": float(out["ptm"][0]),
            })
            if keep_outputs:
                outputs.append({"per_residue_lddt_ca": res.per_residue[0].cpu(), "plddt": plddt[0].cpu(),
                                "atom37_positions": atom37[0].float().cpu(), "atom37_mask": atom37_mask[0].cpu(),
                                "aatype": batch["aatype"][0].cpu(), "residue_index": batch["residue_index"][0].cpu()})
    finally:
        model.train(was_training)
    scored = [c for c in chains if c["n_pairs"] > 0]
    pairs = sum(c["n_pairs"] for c in scored)
    summary = {
        "lddt_ca": _mean(c["lddt_ca"] for c in scored),
        "aggregation": "pooled LDDT-Ca per chain, averaged over chains (OpenFold validation)",
        "lddt_ca_pooled_all": sum(c["score_sum"] for c in scored) / pairs if pairs else float("nan"),
        "lddt_ca_mean_per_residue": _mean(c["lddt_ca_mean_per_residue"] for c in scored),
        "mean_plddt": _mean(c["mean_plddt"] for c in scored),
        "n_chains": len(scored),
        "chains": chains,
    }
    if keep_outputs:
        summary["outputs"] = outputs
    return summary


def validation_baselines(dataset, max_chains: int = 0) -> dict:
    """The sequence-only baselines' LDDT-Cα on the chains `validate` scores (the same crops and masks), averaged
    over chains as its headline is: {"n_chains", "helix": {"lddt_ca"}, "compact": {"lddt_ca"}}."""
    n = len(dataset) if not max_chains else min(max_chains, len(dataset))
    per_chain = []
    for i in range(n):
        feats = dataset[i]
        ca, mask = feats["all_atom_positions"][:, CA].double().numpy(), feats["all_atom_mask"][:, CA].numpy() > 0
        if mask.sum() >= 2:
            per_chain.append(baseline_scores(ca, mask, superpose=False))
    return {"n_chains": len(per_chain), **mean_baselines(per_chain)}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
