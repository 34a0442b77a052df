"""Figures of the NLP harness: a run's curves, and a sweep's metric against trainable parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..runtime.rundir import RunDir

CURVES = "training_curves.png"


def plot_curves(run_dir: Path, primary: str) -> Optional[Path]:
    """RUN/training_curves.png: training loss, and the held-out primary metric, against steps."""
    from matplotlib.figure import Figure

    records = RunDir(run_dir).read_metrics()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict) and primary in r["eval"]]
    if not train and not evals:
        return None
    fig = Figure(figsize=(10, 4), tight_layout=True)
    ax_loss, ax_eval = fig.subplots(1, 2)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="training loss")
        for term in ("rewards/accuracies", "rewards/margins"):
            if all(term in r for r in train):
                ax_loss.plot([r["step"] for r in train], [r[term] for r in train], lw=1.0, label=term)
        ax_loss.legend(fontsize=8)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training (per logged step)")
    if evals:
        ax_eval.plot([r["step"] for r in evals], [r["eval"][primary] for r in evals], "o-", label=primary)
        ax_eval.legend(fontsize=8)
    ax_eval.set_xlabel("optimizer step")
    ax_eval.set_ylabel(f"held-out {primary}")
    fig.suptitle(Path(run_dir).name)
    out = Path(run_dir) / CURVES
    fig.savefig(out, dpi=100)
    return out


def plot_metric_vs_parameters(rows: Sequence[dict], metric: str, out: Path, title: str = "",
                              ylabel: str = "") -> Path:
    """One point per method: held-out `metric` against trainable adapter parameters (log x).

    Methods without adapter parameters (head only, full fine-tuning) are placed at their count of
    trained encoder parameters (head only: 1, drawn at the left edge).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), tight_layout=True)
    ax = fig.subplots()
    for row in rows:
        x = max(1, row["x_parameters"])
        y = row.get(metric)
        if y is None:
            continue
        ax.plot([x], [y], "o", ms=7, label=row["label"])
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable encoder parameters (adapter, or all for full; head excluded)")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title, fontsize=9)
    fig.savefig(out, dpi=110)
    return Path(out)
