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

Beside the model's numbers: the two sequence-only baselines (`eval.baselines`: an ideal α-helix and a
compact random chain of each reference's length, scored the same way) and the model's margin above the
better of them; and the calibration of pLDDT (`eval.calibration`: per-chain correlation with its n and
95% interval, per-residue reliability diagram and expected calibration error), and of pTM against
TM-score when the predictions came with pTM. A statistic without enough data is replaced by the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state, PNGs render with Agg

from esmfold_peft.eval import calibration
from esmfold_peft.eval.baselines import BASELINES, margin, mean_baselines
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
    "baselines": "sequence-only structures scored exactly as the model against the same references: 'helix' an ideal "
                 "α-helix (rise 1.5 Å, radius 2.3 Å, 100° per residue), 'compact' a self-avoiding random walk with "
                 "3.8 Å steps scaled to a globule's radius of gyration 2.2·N^0.38 Å (mean over fixed seeds); "
                 "lddt_ca is the global pooled score",
    "margins": "the model's mean over chains minus the better baseline's mean over the same chains",
    "calibration": "per_chain: Pearson and Spearman of chain mean pLDDT/100 against mean per-residue LDDT-Cα, "
                   "95% interval by Fisher's z, none below the minimum n or spread (caveat says why); per_residue: "
                   "reliability diagram, 10 bins of pLDDT/100 against mean observed per-residue LDDT-Cα, "
                   "ECE = Σ (n_bin/n)·|mean predicted − mean observed|; ptm: pTM against TM-score per chain",
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


def residue_points(chains: Sequence[ChainScores]) -> tuple[np.ndarray, np.ndarray]:
    """(pLDDT / 100, observed LDDT-Cα) of every scored residue with both, over all chains with pLDDT."""
    xs, ys = [np.zeros(0)], [np.zeros(0)]
    for c in chains:
        if c.plddt is None:
            continue
        keep = c.scored & np.isfinite(c.plddt) & np.isfinite(c.lddt.per_residue)
        xs.append(c.plddt[keep] / 100.0)
        ys.append(c.lddt.per_residue[keep])
    return np.concatenate(xs), np.concatenate(ys)


def calibration_summary(chains: Sequence[ChainScores]) -> dict:
    """report.json's `calibration`: per-chain correlation, per-residue reliability, pTM against TM-score."""
    with_ptm = [c for c in chains if c.ptm is not None and math.isfinite(c.ptm)]
    ptm = None
    if with_ptm:
        p = np.array([c.ptm for c in with_ptm])
        t = np.array([c.superposition.tm_score for c in with_ptm])
        ptm = {**calibration.correlation(p, t).as_dict(), "mean_ptm": float(p.mean()),
               "mean_tm_score": float(t.mean()), "mean_absolute_error": float(np.abs(p - t).mean())}
    return {"per_chain": calibration.correlation(*plddt_lddt_points(chains)).as_dict(),
            "per_residue": calibration.reliability(*residue_points(chains)).as_dict(),
            "ptm": ptm}


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
        "ptm": chain.ptm,
        "baselines": chain.baselines,
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
    summary = {
        "n_chains": len(chains),
        "lddt_ca_global_pooled_mean_over_chains": _mean_or_none([c.lddt.global_pooled for c in chains]),
        "lddt_ca_mean_per_residue_mean_over_chains": _mean_or_none([c.lddt.mean_per_residue for c in chains]),
        "lddt_ca_pooled_over_all_pairs": (sum(c.lddt.score_sum for c in chains) / n_pairs) if n_pairs else None,
        "rmsd_ca_mean_over_chains": _mean_or_none([c.superposition.rmsd for c in chains]),
        "gdt_ts_mean_over_chains": _mean_or_none([c.superposition.gdt_ts for c in chains]),
        "tm_score_mean_over_chains": _mean_or_none([c.superposition.tm_score for c in chains]),
        "mean_plddt_mean_over_chains": _mean_or_none([c.mean_plddt for c in chains]),
        "n_chains_with_plddt": sum(c.plddt is not None for c in chains),
        "n_chains_low_identity_or_coverage": sum(c.low_identity_or_coverage for c in chains),
    }
    with_baselines = [c for c in chains if c.baselines is not None]
    if with_baselines:
        base = mean_baselines([c.baselines for c in with_baselines])
        model = {"lddt_ca": _mean_or_none([c.lddt.global_pooled for c in with_baselines]),
                 "tm_score": _mean_or_none([c.superposition.tm_score for c in with_baselines]),
                 "gdt_ts": _mean_or_none([c.superposition.gdt_ts for c in with_baselines])}
        summary["baselines"] = {"n_chains": len(with_baselines), "model": model, **base}
        summary["margins"] = {metric: margin(value, base, metric) for metric, value in model.items()}
    summary["calibration"] = calibration_summary(chains)
    return summary


def _fmt(x: float | None, digits: int = 3) -> str:
    return format_score(x, digits, missing="–")


BASELINE_NAMES = {"helix": "ideal α-helix", "compact": "compact random chain"}


def baselines_markdown(summary: dict) -> list[str]:
    """report.md's baseline table: the model beside the two sequence-only structures, and its margins."""
    base = summary.get("baselines")
    if not base:
        return []
    rows = [f"## Beside sequence-only baselines ({base['n_chains']} chain(s))", "",
            "| | LDDT-Cα | TM-score | GDT-TS |", "|---|---:|---:|---:|",
            "| model | " + " | ".join(_fmt(base["model"][m]) for m in ("lddt_ca", "tm_score", "gdt_ts")) + " |"]
    rows += [f"| {BASELINE_NAMES[b]} | " + " | ".join(_fmt(base[b][m]) for m in ("lddt_ca", "tm_score", "gdt_ts"))
             + " |" for b in BASELINES]
    margins = summary["margins"]
    rows.append("| **model − better baseline** | " + " | ".join(
        "–" if margins[m] is None else f"{margins[m]['margin']:+.3f}" for m in ("lddt_ca", "tm_score", "gdt_ts"))
        + " |")
    return rows + ["", "A structure that knows only the sequence's length scores the baselines; the margin is what "
                   "the model adds (LDDT-Cα here is the global pooled score per chain, mean over chains).", ""]


def calibration_markdown(cal: dict) -> list[str]:
    """report.md's calibration section: statements with their sample sizes, or why there are none."""
    per_chain = calibration.Correlation.from_dict(cal["per_chain"])
    per_residue = calibration.Reliability(**cal["per_residue"])
    lines = ["## Calibration of pLDDT", ""]
    if per_residue.n == 0:
        return lines + ["No pLDDT in the predictions' B-factors: nothing to calibrate.", ""]
    lines += ["- " + per_chain.text("per chain, mean pLDDT against mean per-residue LDDT-Cα"),
              "- " + per_residue.text("per residue, pLDDT against LDDT-Cα"), ""]
    lines += per_residue.table() + [""]
    if cal.get("ptm"):
        ptm = cal["ptm"]
        corr = calibration.Correlation.from_dict(ptm)
        lines += ["## Calibration of pTM", "",
                  f"- mean pTM {ptm['mean_ptm']:.3f} against mean TM-score {ptm['mean_tm_score']:.3f}, mean absolute "
                  f"error {ptm['mean_absolute_error']:.3f} over n = {ptm['n']} chains",
                  "- " + corr.text("per chain, pTM against TM-score"), ""]
    return lines


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
        "",
    ]
    lines += baselines_markdown(summary) + calibration_markdown(summary["calibration"])
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
    corr = calibration.correlation(x, y)
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.subplots()
    ax.scatter(x, y, s=18, alpha=0.8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("predicted: mean pLDDT / 100")
    ax.set_ylabel("true: mean per-residue LDDT-Cα")
    stat = f"Pearson r = {_fmt(corr.pearson_r)}" if corr.caveat is None else "too few or too alike for a correlation"
    ax.set_title(f"one point per chain (n = {len(x)}), {stat}", fontsize=10)
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
        diagram = calibration.plot_reliability(calibration.reliability(*residue_points(chains)),
                                               out_dir / "plddt_reliability.png")
        if diagram is not None:
            figures.append(diagram)

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
