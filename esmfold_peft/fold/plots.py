"""Training curves of a run directory: loss terms and validation LDDT-Cα against steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

LOSS_TERMS = ("loss", "fape", "supervised_chi", "distogram", "plddt", "tm")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if "loss" in r], [r for r in records if "val" in r]


def plot_training_curves(run_dir: Path) -> Optional[Path]:
    """Write RUN/training_curves.png; None when there is nothing to plot yet."""
    from matplotlib.figure import Figure

    train, val = read_metrics(run_dir)
    if not train:
        return None
    fig = Figure(figsize=(10, 4), tight_layout=True)
    ax_loss, ax_val = fig.subplots(1, 2)
    steps = [r["step"] for r in train]
    for term in LOSS_TERMS:
        values = [r.get(term) for r in train]
        if all(v is not None for v in values):
            ax_loss.plot(steps, values, label=term, lw=1.5 if term == "loss" else 1.0)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (per term, unweighted; total weighted)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    if val:
        vs = [r["step"] for r in val]
        ax_val.plot(vs, [r["val"]["lddt_ca"] for r in val], "o-", label="LDDT-Cα (pooled per chain, mean)")
        ax_val.plot(vs, [r["val"]["mean_plddt"] / 100 for r in val], "s--", label="mean pLDDT / 100")
        ax_val.set_ylim(0, 1)
        ax_val.legend(fontsize=8)
    ax_val.set_xlabel("optimizer step")
    ax_val.set_ylabel("validation")
    fig.suptitle(Path(run_dir).name)
    out = Path(run_dir) / "training_curves.png"
    fig.savefig(out, dpi=110)
    return out
