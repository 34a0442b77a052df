"""Evaluate predicted structures against references and write a report.

`evaluate_paths(pred, ref, out_dir)` takes two files, or two directories whose structure files
(.pdb, .ent, .cif, .mmcif, optionally .gz) are matched by file stem (`1abc.pdb` with `1abc.cif.gz`).
A problem with one file or chain (missing counterpart, unparseable file, a chain without Cα or
with non-finite coordinates, chain or residues that cannot be paired) is recorded as an
`EvaluationFailure` naming the file, and everything else is still evaluated. Paths that cannot be
used at all (missing, a file against a directory, no structure file, two directories without one
matching stem) raise `ArtifactError` / `UserError`, an unusable `out_dir` `OutputPathError`, before
anything is read or written.

Evaluating a trained run on its own data split is `esmfold_peft.fold.experiments.evaluate_run`: it needs the
folding model, and eval/ never imports fold/ (fold/ builds on eval/).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path


from esmfold_peft.data.structures import (STRUCTURE_FORMATS, Chain, StructureError, chain_fault, file_stem,
                                          is_structure_file, parse_structure)
from esmfold_peft.eval.chain_scores import ChainScores, score_chain
from esmfold_peft.eval.lddt import LDDT_CUTOFF
from esmfold_peft.eval.pairing import pair_chains
from esmfold_peft.eval.report import EvaluationFailure, ReportFiles, write_report
from esmfold_peft.runtime.errors import ArtifactError, UserError
from esmfold_peft.runtime.progress import Progress
from esmfold_peft.runtime.rundir import ensure_writable_dir

_FORMATS = f"{', '.join(STRUCTURE_FORMATS)}, optionally .gz"


@dataclass(frozen=True)
class EvaluationRun:
    """What `evaluate_paths` / `fold.evaluate_run.evaluate_run` did: scored chains, failures, report files."""

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

    Raises ArtifactError if the directory holds no structure file.
    """
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(directory.iterdir()):
        if path.is_file() and is_structure_file(path):
            by_stem[file_stem(path)].append(path)
    if not by_stem:
        raise ArtifactError(directory, f"no structure files ({_FORMATS}) in this {role} directory")
    files, failures = {}, []
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            failures.append(EvaluationFailure(str(paths[0]), "several structure files share the stem "
                                              f"{stem!r}: {', '.join(p.name for p in paths)}"))
        else:
            files[stem] = paths[0]
    return files, failures


def _stems(files: dict[str, Path], shown: int = 3) -> str:
    """'stems a, b, c and 4 more' (the first few, for a one-line message)."""
    names = sorted(files)
    if not names:
        return "no stem held by one file only"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ("stem " if len(names) == 1 else "stems ") + ", ".join(names[:shown]) + more


def match_structure_files(pred: str | Path, ref: str | Path) -> tuple[list[tuple[Path, Path]], list[EvaluationFailure]]:
    """(prediction, reference) file pairs and failures for unmatched files.

    Two files make one pair. Two directories are matched by file stem; a reference without a
    prediction and a prediction without a reference are failures. Raises ArtifactError if a path
    does not exist, is a file without a structure suffix or a directory without structure files,
    UserError for a file against a directory or two directories without one matching stem.
    """
    pred, ref = Path(pred), Path(ref)
    for role, path in (("prediction", pred), ("reference", ref)):
        if not path.exists():
            raise ArtifactError(path, f"{role} file or directory not found")
        if path.is_file() and not is_structure_file(path):
            raise ArtifactError(path, f"{role} file is not a structure file ({_FORMATS})")
    if pred.is_file() and ref.is_file():
        return [(pred, ref)], []
    if not (pred.is_dir() and ref.is_dir()):
        raise UserError(f"give two files or two directories, not a file and a directory: --pred {pred} --ref {ref}")

    pred_files, failures = _structure_files(pred, "prediction")
    ref_files, ref_failures = _structure_files(ref, "reference")
    failures += ref_failures
    pairs = [(pred_files[s], ref_files[s]) for s in sorted(ref_files) if s in pred_files]
    if not pairs:
        raise UserError(f"no prediction in {pred} shares a file stem with a reference in {ref} "
                        f"({_stems(pred_files)} against {_stems(ref_files)}); files are matched by stem, "
                        "1abc.pdb with 1abc.cif.gz")
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


def _score(pred: Chain, ref: Chain, lddt_cutoff: float) -> ChainScores | EvaluationFailure:
    """The scores of one chain pair, or the failure that names the file at fault."""
    for chain in (pred, ref):
        fault = chain_fault(chain)
        if fault is not None:
            return EvaluationFailure(chain.source, f"chain {chain.chain_id!r} ({chain.name}): {fault}")
    try:
        return score_chain(pred, ref, lddt_cutoff=lddt_cutoff)
    except ValueError as exc:  # PairingError, or a metric's check on its input
        return EvaluationFailure(ref.source, str(exc))


def predicted_ptm(pred_dir: Path) -> dict[str, list[float]]:
    """pTM by predicted file name from the `predictions.json` that predict.py wrote beside the files: per chain
    for a multimer (`ptm_per_chain`), else the one value; records without a pTM (an untrained head) are left
    out, and so is everything when the file is absent or unreadable (the report then has no pTM)."""
    try:
        records = json.loads((pred_dir / "predictions.json").read_text()).get("predictions", [])
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for r in records if isinstance(records, list) else []:
        name = r.get("structure") or r.get("pdb") if isinstance(r, dict) else None  # the file, .pdb or .cif
        if not isinstance(name, str):
            continue
        multimer = isinstance(r.get("n_chains"), int) and r["n_chains"] > 1
        values = r.get("ptm_per_chain") if multimer else [r.get("ptm")]
        if isinstance(values, list) and values and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                      for v in values):
            out[name] = [float(v) for v in values]
    return out


def _with_ptm(chains: list[ChainScores], pred_chains: dict[str, list[str]], ptm: dict[str, list[float]]) -> list:
    """Each chain with its predicted pTM, when predict.py wrote one for its file and chain (`pred_chains`: each
    predicted file's chain names, in file order)."""
    out = []
    for c in chains:
        name = Path(c.pred_file).name
        names = pred_chains.get(c.pred_file, [])
        values = ptm.get(name)
        if values and c.pred_name in names and len(values) == len(names):
            c = replace(c, ptm=values[names.index(c.pred_name)])
        out.append(c)
    return out


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
        progress: show progress (bars on a terminal, log lines elsewhere) while reading files and scoring chains.

    Raises ArtifactError / UserError for unusable `pred` / `ref` paths (see
    `match_structure_files`), OutputPathError for an unusable `out_dir`; everything per file or
    chain is a failure in the result instead.
    """
    file_pairs, failures = match_structure_files(pred, ref)
    ensure_writable_dir(out_dir)
    chain_pairs: list[tuple[Chain, Chain]] = []
    chain_names: dict[str, list[str]] = {}
    for pred_path, ref_path in Progress.over(file_pairs, "reading", enabled=progress, unit="file"):
        pred_chains = _parse(pred_path, failures)
        ref_chains = _parse(ref_path, failures)
        if pred_chains is None or ref_chains is None:
            continue
        chain_names[str(pred_path)] = [c.name for c in pred_chains]
        pairs, problems = pair_chains(pred_chains, ref_chains)
        chain_pairs += pairs
        failures += [EvaluationFailure(str(ref_path), p) for p in problems]

    chains: list[ChainScores] = []
    for pred_chain, ref_chain in Progress.over(chain_pairs, "scoring", enabled=progress, unit="chain"):
        scored = _score(pred_chain, ref_chain, lddt_cutoff)
        if isinstance(scored, EvaluationFailure):
            failures.append(scored)
        else:
            chains.append(scored)

    if Path(pred).is_dir():
        chains = _with_ptm(chains, chain_names, predicted_ptm(Path(pred)))
    files = write_report(chains, out_dir, failures, lddt_cutoff=lddt_cutoff, plots=plots)
    return EvaluationRun(chains=chains, failures=failures, files=files)
