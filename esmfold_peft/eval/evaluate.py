"""Evaluate predicted structures against references and write a report.

`evaluate_paths(pred, ref, out_dir)` takes two files, or two directories whose structure files
(.pdb, .ent, .cif, .mmcif, optionally .gz) are matched by file stem (`1abc.pdb` with `1abc.cif.gz`).
A problem with one file or chain (missing counterpart, unparseable file, chain or residues that
cannot be paired) is recorded as an `EvaluationFailure` naming the file, and everything else is
still evaluated.

`evaluate_run(run_dir, out_dir, split)` evaluates a trained run on its own data split through the
code training validates with (`esmfold_peft.fold.validate.validate` on the dataset
`esmfold_peft.fold.train.build_split` builds), then writes the same report: its LDDT-Cα numbers
are validate's, so the headline equals the validation LDDT-Cα training reports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from esmfold_peft.data.dataset import ChainDataset
from esmfold_peft.data.features import model_residue_index
from esmfold_peft.data.structures import Chain, StructureError, file_stem, is_structure_file, parse_structure
from esmfold_peft.eval.chain_scores import ChainScores, score_chain
from esmfold_peft.eval.lddt import LDDT_CUTOFF, LddtResult
from esmfold_peft.eval.pairing import PairingError, pair_chains
from esmfold_peft.eval.report import EvaluationFailure, ReportFiles, write_report
from esmfold_peft.fold.checkpoint import load_trained_model
from esmfold_peft.fold.predict import resolve_device
from esmfold_peft.fold.train import build_split, resolve_paths
from esmfold_peft.fold.validate import maybe, validate

SPLITS = ("val", "train")


@dataclass(frozen=True)
class EvaluationRun:
    """What `evaluate_paths` / `evaluate_run` did: scored chains, failures, and the report files."""

    chains: list[ChainScores]
    failures: list[EvaluationFailure]
    files: ReportFiles
    validation: dict | None = None  # evaluate_run: validate()'s summary (headline `lddt_ca`), no outputs

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures


def _structure_files(directory: Path, role: str) -> tuple[dict[str, Path], list[EvaluationFailure]]:
    """Structure files of a directory (not recursive) by stem; two files with one stem is a failure.

    Raises ValueError if the directory holds no structure file.
    """
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(directory.iterdir()):
        if path.is_file() and is_structure_file(path):
            by_stem[file_stem(path)].append(path)
    if not by_stem:
        raise ValueError(f"no structure files (.pdb, .ent, .cif, .mmcif, optionally .gz) in the {role} "
                         f"directory {directory}")
    files, failures = {}, []
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            failures.append(EvaluationFailure(str(paths[0]), "several structure files share the stem "
                                              f"{stem!r}: {', '.join(p.name for p in paths)}"))
        else:
            files[stem] = paths[0]
    return files, failures


def match_structure_files(pred: str | Path, ref: str | Path) -> tuple[list[tuple[Path, Path]], list[EvaluationFailure]]:
    """(prediction, reference) file pairs and failures for unmatched files.

    Two files make one pair. Two directories are matched by file stem; a reference without a
    prediction and a prediction without a reference are failures. Raises FileNotFoundError if a
    path does not exist, ValueError for a file against a directory or an empty directory.
    """
    pred, ref = Path(pred), Path(ref)
    for role, path in (("prediction", pred), ("reference", ref)):
        if not path.exists():
            raise FileNotFoundError(f"{role} path not found: {path}")
    if pred.is_file() and ref.is_file():
        return [(pred, ref)], []
    if not (pred.is_dir() and ref.is_dir()):
        raise ValueError(f"give two files or two directories, not a file and a directory: --pred {pred} --ref {ref}")

    pred_files, failures = _structure_files(pred, "prediction")
    ref_files, ref_failures = _structure_files(ref, "reference")
    failures += ref_failures
    pairs = [(pred_files[s], ref_files[s]) for s in sorted(ref_files) if s in pred_files]
    failures += [EvaluationFailure(str(ref_files[s]), f"no prediction with stem {s!r} in {pred}")
                 for s in sorted(ref_files) if s not in pred_files]
    failures += [EvaluationFailure(str(pred_files[s]), f"no reference with stem {s!r} in {ref}")
                 for s in sorted(pred_files) if s not in ref_files]
    return pairs, failures


def _parse(path: Path, failures: list[EvaluationFailure]) -> list[Chain] | None:
    try:
        return parse_structure(path)
    except StructureError as exc:
        failures.append(EvaluationFailure(exc.path, exc.reason))
        return None


def evaluate_paths(pred: str | Path, ref: str | Path, out_dir: str | Path,
                   lddt_cutoff: float = LDDT_CUTOFF, plots: bool = True,
                   progress: bool = True) -> EvaluationRun:
    """Evaluate predictions against references (files or directories) and write the report.

    Args:
        pred: a predicted structure file, or a directory of them.
        ref: the reference structure file, or a directory matched to `pred` by file stem.
        out_dir: where `report.json`, `report.md` and the figures go (created if needed).
        lddt_cutoff: LDDT inclusion radius in Å (15 in the AF2/OpenFold convention).
        plots: write the PNG figures.
        progress: show tqdm progress bars (reading files, scoring chains).

    Raises FileNotFoundError / ValueError for unusable `pred` / `ref` paths (see
    `match_structure_files`); everything per file or chain is a failure in the result instead.
    """
    file_pairs, failures = match_structure_files(pred, ref)
    chain_pairs: list[tuple[Chain, Chain]] = []
    for pred_path, ref_path in tqdm(file_pairs, desc="reading", unit="file", disable=not progress):
        pred_chains = _parse(pred_path, failures)
        ref_chains = _parse(ref_path, failures)
        if pred_chains is None or ref_chains is None:
            continue
        pairs, problems = pair_chains(pred_chains, ref_chains)
        chain_pairs += pairs
        failures += [EvaluationFailure(str(ref_path), p) for p in problems]

    chains: list[ChainScores] = []
    for pred_chain, ref_chain in tqdm(chain_pairs, desc="scoring", unit="chain", disable=not progress):
        try:
            chains.append(score_chain(pred_chain, ref_chain, lddt_cutoff=lddt_cutoff))
        except PairingError as exc:
            failures.append(EvaluationFailure(ref_chain.source, str(exc)))

    files = write_report(chains, out_dir, failures, lddt_cutoff=lddt_cutoff, plots=plots)
    return EvaluationRun(chains=chains, failures=failures, files=files)


# --- a trained run on one of its data splits -------------------------------------------------------

def split_dataset(cfg, split: str, progress: bool = True) -> ChainDataset:
    """The chains of a run's `split` ('val' or 'train') as training's validation reads them.

    Built by `build_split`, as in training (the split's chain cache is reused when up to date). The
    training split is cropped like the validation split (`val.crop_size`, 0 = whole chains), not
    with the training crop.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    resolve_paths(cfg)
    dataset = build_split(cfg, split, is_main=progress, crop_size=cfg.val.crop_size or None)
    if dataset is None:
        raise ValueError(f"the run has no {'validation' if split == 'val' else split} chains "
                         f"(data.source={cfg.data.source}; a 'dir' run needs "
                         "data.val_dir, an 'openfold' run data.val_mmcif_dir)")
    return dataset


def _validated_chain_scores(dataset: ChainDataset, index: int, summary: dict, outputs: dict,
                            source: str) -> ChainScores:
    """Scores of one validated chain; LDDT-Cα and pLDDT are validate()'s, the rest from its coordinates.

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
    return replace(scores, lddt=lddt, plddt=plddt)


def evaluate_run(run_dir: str | Path, out_dir: str | Path, split: str = "val", checkpoint: str | Path | None = None,
                 device: str | None = None, num_recycles: int | None = None, max_chains: int | None = None,
                 plots: bool = True, progress: bool = True) -> EvaluationRun:
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

    LDDT-Cα (per chain, per residue, and so the headline) and pLDDT come from `validate`, so the
    report's `lddt_ca_global_pooled_mean_over_chains` is training's validation LDDT-Cα; RMSD, GDT-TS
    and TM-score are computed here from the same predicted coordinates. `report.json` gains a `run`
    section (settings and validate's summary), `report.md` a "Run" section.
    """
    run_dir = Path(run_dir)
    model, cfg = load_trained_model(run_dir, Path(checkpoint) if checkpoint else None)
    dataset = split_dataset(cfg, split, progress=progress)
    torch_device = resolve_device(device)
    bf16 = bool(cfg.train.bf16) and torch_device.type == "cuda"
    recycles = int(cfg.val.num_recycles if num_recycles is None else num_recycles)
    if max_chains is None:
        max_chains = int(cfg.data.val_max_chains) if split == "val" else 0
    result = validate(model.to(torch_device), dataset, torch_device, num_recycles=recycles, bf16=bf16,
                      max_chains=max_chains, progress=progress, keep_outputs=True)

    source = f"{run_dir} ({split} split prediction)"
    chains, failures = [], []
    for index, (summary, outputs) in enumerate(zip(result["chains"], result["outputs"])):
        try:
            chains.append(_validated_chain_scores(dataset, index, summary, outputs, source))
        except ValueError as exc:  # PairingError, or non-finite predicted coordinates
            failures.append(EvaluationFailure(dataset.cache.records[index].path, f"{summary['name']}: {exc}"))
    validation = {k: maybe(result[k]) if isinstance(result[k], float) else result[k]
                  for k in ("lddt_ca", "aggregation", "lddt_ca_pooled_all", "lddt_ca_mean_per_residue",
                            "mean_plddt", "n_chains")}
    run_info = {"run_dir": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else None, "split": split,
                "n_chains_in_split": len(dataset), "max_chains": max_chains, "num_recycles": recycles,
                "device": str(torch_device), "bf16": bf16, "validation": validation,
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
