"""Evaluate a trained run on one of its data splits, as training validates it, and write the report.

`evaluate_run(run_dir, out_dir, split)` predicts the split's chains through the code training
validates with (`validate.validate` on the dataset `train.build_split` builds) and writes the
report `eval.report.write_report` writes for structure files: its LDDT-Cα numbers are validate's, so
the headline equals the validation LDDT-Cα training reports. RMSD, GDT-TS and TM-score come from
`eval.chain_scores.score_chain` on the same predicted coordinates.

This lives in fold/ because it needs the folding model; eval/ knows only structures.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ...data.dataset import ChainDataset
from ...data.features import model_residue_index
from ...eval.chain_scores import ChainScores, score_chain
from ...eval.evaluate import EvaluationRun
from ...eval.lddt import LDDT_CUTOFF, LddtResult
from ...eval.report import EvaluationFailure, write_report
from ...runtime.errors import ConfigError
from ...runtime.rundir import ensure_writable_dir
from ...runtime.session import resolve_device
from ...runtime.text import finite_or_none
from ..run.checkpoint import load_trained_model
from ..run.confidence import ConfidenceHeads, model_heads
from ..run.resolve import fill_defaults
from ..train import build_split
from ..validate import validate

SPLITS = ("val", "train")


def split_dataset(cfg, split: str, progress: bool = True) -> ChainDataset:
    """The chains of a run's `split` ('val' or 'train') as training's validation reads them.

    Built by `build_split`, as in training (the split's chain cache is reused when up to date). The
    training split is cropped like the validation split (`val.crop_size`, 0 = whole chains), not
    with the training crop.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    fill_defaults(cfg)
    dataset = build_split(cfg, split, is_main=progress, crop_size=cfg.val.crop_size or None)
    if dataset is None:
        raise ConfigError(f"the run has no {'validation' if split == 'val' else split} chains "
                          f"(data.source={cfg.data.source}; a 'dir' run needs "
                          "data.val_dir, an 'openfold' run data.val_mmcif_dir)")
    return dataset


def _validated_chain_scores(dataset: ChainDataset, index: int, summary: dict, outputs: dict,
                            source: str, heads: ConfidenceHeads) -> ChainScores:
    """Scores of one validated chain; LDDT-Cα, pLDDT and pTM are validate()'s (pLDDT and pTM only from heads
    that were trained, `heads`), the rest from its coordinates.

    The reference is the cached chain, cut to the window validate saw (the crop is found from the
    model residue index, which increases strictly along the chain).
    """
    full = dataset.cache.load(index)
    length = len(outputs["aatype"])
    start = int(np.searchsorted(model_residue_index(full.residue_index), int(outputs["residue_index"][0])))
    window = slice(start, start + length)
    ref = replace(full, sequence=full.sequence[window], aatype=full.aatype[window],
                  atom37_positions=full.atom37_positions[window], atom37_mask=full.atom37_mask[window],
                  b_factors=full.b_factors[window], residue_index=full.residue_index[window],
                  insertion_codes=full.insertion_codes[window])
    positions, atom_mask = outputs["atom37_positions"], outputs["atom37_mask"]
    plddt = outputs["plddt"].double().numpy()
    pred = replace(ref, atom37_positions=positions.numpy(), atom37_mask=atom_mask.numpy(),
                   b_factors=np.repeat(plddt[:, None], atom_mask.shape[-1], axis=1).astype(np.float32), source=source)
    scores = score_chain(pred, ref)
    lddt = LddtResult(global_pooled=summary["lddt_ca"], per_residue=outputs["per_residue_lddt_ca"].double().numpy(),
                      mean_per_residue=summary["lddt_ca_mean_per_residue"], n_pairs=summary["n_pairs"],
                      score_sum=summary["score_sum"])
    return replace(scores, lddt=lddt, plddt=plddt if heads.plddt else None,
                   ptm=summary["ptm"] if heads.ptm else None)


def evaluate_run(run_dir: str | Path, out_dir: str | Path, split: str = "val", checkpoint: str | Path | None = None,
                 device: str | None = None, num_recycles: int | None = None, max_chains: int | None = None,
                 plots: bool = True, progress: bool = True, overrides: Sequence[str] = (),
                 allow_other_base: bool = False) -> EvaluationRun:
    """Evaluate a trained run on one of its data splits, as training validates, and write the report.

    Args:
        run_dir: the training run directory.
        out_dir: where `report.json`, `report.md` and the figures go (created if needed).
        split: 'val' (the run's validation chains) or 'train' (its training chains, uncropped).
        checkpoint: a training checkpoint to evaluate instead of the run's exported model.
        device: 'cpu', 'cuda', ...; None picks CUDA when available. bf16 autocast is used on CUDA
            when the run trained with it (`train.bf16`), as its validation did.
        num_recycles: trunk recycles; None takes the run's `val.num_recycles`.
        max_chains: evaluate the first N chains only (0 = all); None takes the run's
            `data.val_max_chains` for 'val' and all chains for 'train'.
        plots: write the PNG figures.
        progress: progress bars.
        overrides: `key=value` changes to the run's config for this use (a moved language model or
            data folder, `model.trunk.chunk_size`, …); what would change the trained model is refused.
        allow_other_base: load the run's adapters onto frozen weights other than their own (refused by default).

    Raises ConfigError when the run has no chains in `split`, OutputPathError for an unusable
    `out_dir`, and the checkpoint / model loaders' errors for a run that cannot be loaded.

    LDDT-Cα (per chain, per residue, and so the headline) and pLDDT come from `validate`, so the
    report's `lddt_ca_global_pooled_mean_over_chains` is training's validation LDDT-Cα; RMSD, GDT-TS
    and TM-score are computed here from the same predicted coordinates. `report.json` gains a `run`
    section (settings and validate's summary), `report.md` a "Run" section.
    """
    run_dir = Path(run_dir)
    ensure_writable_dir(out_dir)  # before loading the model and building the split's cache, which take time
    model, cfg = load_trained_model(run_dir, Path(checkpoint) if checkpoint else None, overrides=overrides,
                                    allow_other_base=allow_other_base)
    dataset = split_dataset(cfg, split, progress=progress)
    torch_device = resolve_device(device)
    bf16 = bool(cfg.train.bf16) and torch_device.type == "cuda"
    recycles = int(cfg.val.num_recycles if num_recycles is None else num_recycles)
    if max_chains is None:
        max_chains = int(cfg.data.val_max_chains) if split == "val" else 0
    result = validate(model.to(torch_device), dataset, torch_device, num_recycles=recycles, bf16=bf16,
                      max_chains=max_chains, progress=progress, keep_outputs=True)

    source = f"{run_dir} ({split} split prediction)"
    heads = model_heads(model, cfg)
    chains, failures = [], []
    for index, (summary, outputs) in enumerate(zip(result["chains"], result["outputs"])):
        try:
            chains.append(_validated_chain_scores(dataset, index, summary, outputs, source, heads))
        except ValueError as exc:  # PairingError, or non-finite predicted coordinates
            failures.append(EvaluationFailure(dataset.cache.records[index].path, f"{summary['name']}: {exc}"))
    validation = {k: finite_or_none(result[k]) if isinstance(result[k], float) else result[k]
                  for k in ("lddt_ca", "aggregation", "lddt_ca_pooled_all", "lddt_ca_mean_per_residue",
                            "mean_plddt", "n_chains")}
    run_info = {"run_dir": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else None, "split": split,
                "n_chains_in_split": len(dataset), "max_chains": max_chains, "num_recycles": recycles,
                "device": str(torch_device), "bf16": bf16, "validation": validation,
                "confidence": heads.as_dict(),
                "lddt_source": "per-chain and per-residue LDDT-Ca and pLDDT are esmfold_peft.fold.validate.validate's "
                               "(the function training validates with); RMSD, GDT-TS and TM-score are computed "
                               "from the same predicted coordinates"}
    files = write_report(chains, out_dir, failures, lddt_cutoff=LDDT_CUTOFF, plots=plots, extra={"run": run_info},
                         extra_markdown=_run_markdown(run_info))
    return EvaluationRun(chains=chains, failures=failures, files=files, validation=validation)


def _run_markdown(run_info: dict) -> str:
    """The report.md section on the run, its settings and validate()'s summary."""
    v = run_info["validation"]
    headline = "–" if v["lddt_ca"] is None else f"{v['lddt_ca']:.4f}"
    return "\n".join([
        "", "## Run", "",
        f"Run `{run_info['run_dir']}`" + (f", checkpoint `{run_info['checkpoint']}`" if run_info["checkpoint"] else "")
        + f", {run_info['split']} split: {v['n_chains']} of {run_info['n_chains_in_split']} chain(s) scored, "
        f"{run_info['num_recycles']} recycle(s), device {run_info['device']}" + (" (bf16)" if run_info["bf16"] else "")
        + ".", "",
        f"Validation LDDT-Cα (as training reports it: {v['aggregation']}): **{headline}**. "
        "LDDT-Cα and pLDDT above are `fold.validate.validate`'s; RMSD, GDT-TS and TM-score are computed from the "
        "same predicted coordinates.", ""])
