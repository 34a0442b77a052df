"""Evaluation reports: `report.json` (everything), `report.md` (a readable table) and PNG plots.

Scales: LDDT-Cα, GDT-TS and TM-score as fractions in [0, 1]; RMSD in Å; pLDDT in 0..100 (as ESMFold
writes it into B-factors). Every aggregate names its aggregation:

* `lddt_ca_global_pooled` (per chain): pooled over the chain's scored pairs;
* `lddt_ca_mean_per_residue` (per chain): mean of the per-residue scores;
* `..._mean_over_chains` (overall): unweighted mean of the per-chain values (OpenFold's validation
  number is `lddt_ca_global_pooled_mean_over_chains`);
* `lddt_ca_pooled_over_all_pairs` (overall): all scored pairs of all chains pooled together.

A chain whose pairing has low sequence identity or coverage (`chain_scores.MIN_SEQUENCE_IDENTITY`,
`MIN_COVERAGE`) is flagged: `low_identity_or_coverage` in report.json, ⚠ and a list in report.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state, PNGs render with Agg

from esmfold_peft.eval.chain_scores import MIN_COVERAGE, MIN_SEQUENCE_IDENTITY, ChainScores
from esmfold_peft.eval.lddt import LDDT_CUTOFF, LDDT_THRESHOLDS
from esmfold_peft.eval.metrics import GDT_TS_CUTOFFS
from esmfold_peft.runtime.rundir import ensure_writable_dir
from esmfold_peft.runtime.text import finite_or_none, format_score

CHAINS_PER_FIGURE = 12
_GRID_COLUMNS = 3

CONVENTIONS = {
    "lddt_ca": "LDDT-Cα (Mariani et al. 2013, AF2/OpenFold convention): Cα only, pairs i != j with reference "
               "distance < settings.lddt_cutoff, pair score = fraction of thresholds with |d_pred - d_ref| < threshold, "
               "no superposition; residues missing in the reference excluded, reference residues the "
               "prediction lacks score 0; scale 0..1",
    "lddt_ca_global_pooled": "per chain: sum of pair scores / number of scored pairs",
    "lddt_ca_mean_per_residue": "per chain: mean over residues of each residue's pooled pair score",
    "rmsd_ca": "Å, after the optimal superposition (Kabsch) of all scored residues, over those residues",
    "gdt_ts": "0..1 (x100 for CASP's scale): mean over cutoffs 1, 2, 4, 8 Å of the largest fraction of "
              "reference residues within the cutoff (<=) under one superposition; the maximum is searched "
              "as TMscore.f does, plus one extension track per cutoff (esmfold_peft.eval.metrics)",
    "tm_score": "0..1, normalised by the number of reference residues with a Cα",
    "mean_plddt": "0..100, mean Cα B-factor of the predicted residues scored, when the prediction's "
                  "B-factors are pLDDT values (all in 0..100 and not constant); null otherwise",
    "mean_over_chains": "unweighted mean of the per-chain values over the chains that have one",
    "lddt_ca_pooled_over_all_pairs": "sum of pair scores over all chains / number of scored pairs over all chains",
    "sequence_identity": "identical residues / paired residues",
    "coverage": "paired residues / reference residues",
    "low_identity_or_coverage": f"sequence_identity < {MIN_SEQUENCE_IDENTITY:g} or coverage < {MIN_COVERAGE:g}: "
                                "the prediction is probably not of this chain, or covers only part of it",
}


@dataclass(frozen=True)
class EvaluationFailure:
    """A file or chain that could not be evaluated, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def plddt_lddt_points(chains: Sequence[ChainScores]) -> tuple[np.ndarray, np.ndarray]:
    """(mean pLDDT / 100, mean per-residue LDDT-Cα) for each chain with pLDDT.

    Both are means over the same scored residues, so they are the like-for-like pair (the pLDDT
    head predicts per-residue LDDT-Cα).
    """
    pairs = [(c.mean_plddt / 100.0, c.lddt.mean_per_residue) for c in chains
             if c.mean_plddt is not None and math.isfinite(c.lddt.mean_per_residue)]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    x, y = np.array(pairs).T
    return x, y


def pearson_r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, or None with fewer than 2 points or a constant variable."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def chain_record(chain: ChainScores) -> dict:
    """The JSON record of one chain."""
    sup = chain.superposition
    return {
        "name": chain.name,
        "pred_name": chain.pred_name,
        "ref_file": chain.ref_file,
        "pred_file": chain.pred_file,
        "length": chain.length,
        "pred_length": chain.pred_length,
        "n_ref_with_ca": chain.n_ref_with_ca,
        "n_scored": chain.n_scored,
        "pairing": chain.pairing.method,
        "n_paired": len(chain.pairing),
        "sequence_identity": chain.sequence_identity,
        "coverage": chain.coverage,
        "low_identity_or_coverage": chain.low_identity_or_coverage,
        "lddt_ca_global_pooled": finite_or_none(chain.lddt.global_pooled),
        "lddt_ca_mean_per_residue": finite_or_none(chain.lddt.mean_per_residue),
        "lddt_ca_n_pairs": chain.lddt.n_pairs,
        "lddt_ca_score_sum": chain.lddt.score_sum,
        "rmsd_ca": sup.rmsd,
        "gdt_ts": sup.gdt_ts,
        "gdt_fractions": {f"{c:g}": f for c, f in sup.gdt_fractions.items()},
        "tm_score": sup.tm_score,
        "mean_plddt": chain.mean_plddt,
        "per_residue": {
            "residue": chain.residue_labels,
            "scored": chain.scored.tolist(),
            "lddt_ca": [finite_or_none(v) for v in chain.lddt.per_residue],
            "plddt": None if chain.plddt is None else [finite_or_none(v) for v in chain.plddt],
        },
    }


def summarize(chains: Sequence[ChainScores]) -> dict:
    """Overall numbers over chains, each named by its aggregation (module docstring)."""
    n_pairs = sum(c.lddt.n_pairs for c in chains)
    x, y = plddt_lddt_points(chains)
    return {
        "n_chains": len(chains),
        "lddt_ca_global_pooled_mean_over_chains": _mean_or_none([c.lddt.global_pooled for c in chains]),
        "lddt_ca_mean_per_residue_mean_over_chains": _mean_or_none([c.lddt.mean_per_residue for c in chains]),
        "lddt_ca_pooled_over_all_pairs": (sum(c.lddt.score_sum for c in chains) / n_pairs) if n_pairs else None,
        "rmsd_ca_mean_over_chains": _mean_or_none([c.superposition.rmsd for c in chains]),
        "gdt_ts_mean_over_chains": _mean_or_none([c.superposition.gdt_ts for c in chains]),
        "tm_score_mean_over_chains": _mean_or_none([c.superposition.tm_score for c in chains]),
        "mean_plddt_mean_over_chains": _mean_or_none([c.mean_plddt for c in chains]),
        "n_chains_with_plddt": sum(c.plddt is not None for c in chains),
        "plddt_vs_lddt_ca_mean_per_residue_pearson_r": pearson_r(x, y),
        "n_chains_low_identity_or_coverage": sum(c.low_identity_or_coverage for c in chains),
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return format_score(x, digits, missing="–")


def markdown_report(summary: dict, chains: Sequence[ChainScores], failures: Sequence[EvaluationFailure],
                    figures: Sequence[Path]) -> str:
    """The text of `report.md`."""
    lines = [
        "# Structure evaluation",
        "",
        f"{summary['n_chains']} chain(s) evaluated, {len(failures)} failure(s). "
        "LDDT-Cα, GDT-TS and TM-score in 0..1, RMSD in Å, pLDDT in 0..100; "
        "conventions in `report.json` (`conventions`).",
        "",
        "| overall | value |",
        "|---|---|",
        f"| LDDT-Cα, global pooled per chain, mean over chains | {_fmt(summary['lddt_ca_global_pooled_mean_over_chains'])} |",
        f"| LDDT-Cα, mean per-residue per chain, mean over chains | {_fmt(summary['lddt_ca_mean_per_residue_mean_over_chains'])} |",
        f"| LDDT-Cα, pooled over all pairs of all chains | {_fmt(summary['lddt_ca_pooled_over_all_pairs'])} |",
        f"| RMSD-Cα (Å), mean over chains | {_fmt(summary['rmsd_ca_mean_over_chains'], 2)} |",
        f"| GDT-TS, mean over chains | {_fmt(summary['gdt_ts_mean_over_chains'])} |",
        f"| TM-score, mean over chains | {_fmt(summary['tm_score_mean_over_chains'])} |",
        f"| mean pLDDT, mean over {summary['n_chains_with_plddt']} chain(s) with pLDDT | {_fmt(summary['mean_plddt_mean_over_chains'], 1)} |",
        f"| Pearson r, chain mean pLDDT vs mean per-residue LDDT-Cα | {_fmt(summary['plddt_vs_lddt_ca_mean_per_residue_pearson_r'])} |",
        "",
    ]
    flagged = [c.similarity_warning() for c in chains if c.low_identity_or_coverage]
    if flagged:
        lines += [f"## ⚠ {len(flagged)} chain(s) with low sequence identity or coverage", ""] + \
                 [f"- ⚠ {w}" for w in flagged] + [""]
    if chains:
        lines += [
            "| chain | length | scored | pairing | LDDT-Cα pooled | LDDT-Cα mean per-res. | RMSD Å | GDT-TS | TM-score | mean pLDDT |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in chains:
            flag = " ⚠" if c.low_identity_or_coverage else ""
            lines.append(
                f"| {c.name}{flag} | {c.length} | {c.n_scored} | {c.pairing.method} | {_fmt(c.lddt.global_pooled)} | "
                f"{_fmt(c.lddt.mean_per_residue)} | {_fmt(c.superposition.rmsd, 2)} | {_fmt(c.superposition.gdt_ts)} | "
                f"{_fmt(c.superposition.tm_score)} | {_fmt(c.mean_plddt, 1)} |")
        lines.append("")
    if failures:
        lines += ["## Failures", ""] + [f"- `{f.path}`: {f.reason}" for f in failures] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _residue_axis(chain: ChainScores) -> tuple[np.ndarray, str]:
    """Author residue numbers when they identify residues, else positions in the chain."""
    numbers = chain.residue_numbers
    if len(set(chain.residue_labels)) == len(numbers) and len(np.unique(numbers)) == len(numbers):
        return numbers, "reference residue number"
    return np.arange(1, len(numbers) + 1), "position in reference chain"


def plot_per_residue(chains: Sequence[ChainScores], out_dir: Path,
                     chains_per_figure: int = CHAINS_PER_FIGURE) -> list[Path]:
    """Per-residue LDDT-Cα along each reference chain, with pLDDT/100 where available.

    A grid of up to `chains_per_figure` chains per PNG: `per_residue_lddt_001.png`, ...
    """
    paths = []
    for page, start in enumerate(range(0, len(chains), chains_per_figure), start=1):
        group = chains[start:start + chains_per_figure]
        cols = min(_GRID_COLUMNS, len(group))
        rows = math.ceil(len(group) / cols)
        fig = Figure(figsize=(5 * cols, 2.8 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, chain in zip(axes.flat, group):
            x, xlabel = _residue_axis(chain)
            ax.plot(x, chain.lddt.per_residue, lw=1.2, color="tab:blue", label="LDDT-Cα")
            if chain.plddt is not None:
                ax.plot(x, chain.plddt / 100.0, lw=1.0, color="tab:orange", label="pLDDT / 100")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(f"{chain.name}  LDDT-Cα (pooled) {_fmt(chain.lddt.global_pooled)}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, loc="lower left")
        for ax in list(axes.flat)[len(group):]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"per_residue_lddt_{page:03d}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_plddt_vs_lddt(chains: Sequence[ChainScores], path: Path) -> Path | None:
    """Scatter of chain mean pLDDT/100 against chain mean per-residue LDDT-Cα; None without pLDDT."""
    x, y = plddt_lddt_points(chains)
    if len(x) == 0:
        return None
    r = pearson_r(x, y)
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.subplots()
    ax.scatter(x, y, s=18, alpha=0.8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("predicted: mean pLDDT / 100")
    ax.set_ylabel("true: mean per-residue LDDT-Cα")
    ax.set_title(f"one point per chain ({len(x)}), Pearson r = {_fmt(r)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by `write_report`."""

    json: Path
    markdown: Path
    figures: list[Path]


def write_report(chains: Sequence[ChainScores], out_dir: str | Path,
                 failures: Sequence[EvaluationFailure] = (), lddt_cutoff: float = LDDT_CUTOFF,
                 plots: bool = True, extra: dict | None = None, extra_markdown: str = "") -> ReportFiles:
    """Write `report.json`, `report.md` and (with `plots`) the PNG figures into `out_dir`.

    `lddt_cutoff` is the inclusion radius the chains were scored with (recorded in `settings`);
    `extra` adds top-level sections to report.json and `extra_markdown` text to report.md.
    """
    out_dir = ensure_writable_dir(out_dir)
    figures: list[Path] = []
    if plots and chains:
        figures += plot_per_residue(chains, out_dir)
        scatter = plot_plddt_vs_lddt(chains, out_dir / "plddt_vs_lddt.png")
        if scatter is not None:
            figures.append(scatter)

    summary = summarize(chains)
    report = {
        "conventions": CONVENTIONS,
        "settings": {
            "lddt_cutoff": lddt_cutoff,
            "lddt_thresholds": list(LDDT_THRESHOLDS),
            "gdt_cutoffs": list(GDT_TS_CUTOFFS),
        },
        "overall": summary,
        "chains": [chain_record(c) for c in chains],
        "failures": [{"path": f.path, "reason": f.reason} for f in failures],
        "figures": [p.name for p in figures],
        **(extra or {}),
    }
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(markdown_report(summary, chains, failures, figures) + extra_markdown)
    return ReportFiles(json=json_path, markdown=md_path, figures=figures)
