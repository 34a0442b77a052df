"""Table 1 in small: every method on one classification task, trainable parameters against the metric.

Each method trains in its own run directory under the sweep folder (a finished run is reused, an
interrupted one resumed), then `table.md` (markdown), `sweep.json` and `metric_vs_parameters.png`
(log x) are written from the runs' summaries.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import ml_collections as mlc

from ..adapters import is_adapted
from ..runtime.config import apply_overrides
from ..runtime.errors import COMPLETED, EXIT_INTERRUPTED, EXIT_OK, UserError
from ..runtime.rundir import RunDir
from ..runtime.text import format_count, format_score, markdown_table
from .config import config_for_resume, resolve_defaults
from .plots import plot_metric_vs_parameters
from .train import train

log = logging.getLogger("esmfold_peft.nlp")

# (method, rank): the paper's Table 1 rows, in small
DEFAULT_GRID = (("lorta", 1), ("lorta", 4), ("lorta", 8), ("lora", 1), ("lora", 8), ("none", 0), ("full", 0))


def _grid_entry(item: str) -> tuple[str, int]:
    """One --runs entry: `lorta:4`, `lora:8`, `none` (head only) or `full`, as scripts/sweep.py writes them; the
    old forms `lorta-r4` and `head-only` are still read."""
    text = item.lower()
    if text in ("none", "head-only", "full"):
        return ("full", 0) if text == "full" else ("none", 0)
    method, sep, rank = text.partition(":")
    if not sep:
        method, sep, rank = text.partition("-r")
    if sep and is_adapted(method) and rank.isdigit() and int(rank) >= 1:
        return method, int(rank)
    if method in ("none", "full", "head-only"):
        raise UserError(f"--runs entry {item!r}: {method} takes no rank (write just {method!r})")
    raise UserError(f"--runs entry {item!r}: expected lorta:RANK, lora:RANK, none or full (e.g. lorta:4)")


def parse_grid(text: Optional[str]) -> tuple:
    """'lorta:4,lora:8,none,full' -> (('lorta', 4), ('lora', 8), ('none', 0), ('full', 0)); empty: DEFAULT_GRID."""
    if not text or not text.strip():
        return DEFAULT_GRID
    grid = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        entry = _grid_entry(item)
        if entry in grid:
            raise UserError(f"--runs entry {item!r} is listed twice")
        grid.append(entry)
    return tuple(grid)


def label(method: str, rank: int) -> str:
    return f"{method}-r{rank}" if is_adapted(method) else {"none": "head-only", "full": "full"}[method]


def run_sweep(make_config: Callable[[], mlc.ConfigDict], out: Path, grid: Sequence[tuple] = DEFAULT_GRID,
              overrides: Sequence[str] = (), progress: bool = True) -> int:
    """Train every (method, rank) of `grid`; write the table and the plot; return an exit status."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for method, rank in grid:
        folder = out / label(method, rank)
        run = RunDir(folder)
        if run.status() == COMPLETED:
            log.info("%s: done before, reused", folder)
            continue
        if run.last_checkpoint.exists():
            cfg = resolve_defaults(config_for_resume(run.read_config(), []))
            status = train(cfg, folder, resume=True, progress=progress)
        else:
            cfg = make_config()
            sets = [f"adapter.method={method}"] + ([f"adapter.rank={rank}"] if rank else []) + list(overrides)
            cfg = resolve_defaults(apply_overrides(cfg, sets))
            status = train(cfg, folder, progress=progress)
        if status == EXIT_INTERRUPTED:
            write_report(out, grid)
            return status
        if status != EXIT_OK:
            log.error("%s ended with status %d; the sweep goes on", folder, status)
    write_report(out, grid)
    return EXIT_OK


def collect(out: Path, grid: Sequence[tuple]) -> list[dict]:
    rows = []
    for method, rank in grid:
        run = RunDir(Path(out) / label(method, rank))
        if run.status() != COMPLETED:
            continue
        s = run.read_summary()
        p = s["parameters"]
        encoder = p["adapter"] if is_adapted(method) else (p["trainable"] - p["head"] if method == "full" else 0)
        final = s.get("eval_final") or {}
        rows.append({"label": label(method, rank), "method": method, "rank": rank or None, "adapter": p["adapter"],
                     "x_parameters": encoder, "head": p["head"], "trainable": p["trainable"],
                     "primary": s["primary_metric"], "initial": s["primary_initial"], "final": s["primary_final"],
                     **{k: v for k, v in final.items() if isinstance(v, (int, float))},
                     "wall_time_s": s["wall_time_s"], "steps": s["steps"], "task": s["task"], "model": s["model"]})
    return rows


def write_report(out: Path, grid: Sequence[tuple] = DEFAULT_GRID) -> Optional[Path]:
    rows = collect(out, grid)
    if not rows:
        return None
    metric = rows[0]["primary"]
    extra = [k for k in rows[0] if k not in {"label", "method", "rank", "adapter", "x_parameters", "head", "trainable",
                                             "primary", "initial", "final", "wall_time_s", "steps", "task", "model",
                                             metric}]
    header = ["method", "encoder params trained", "head params", f"{metric} (start)", f"{metric} (end)"] + extra + \
        ["time (s)"]
    table = [[r["label"], format_count(r["x_parameters"]), format_count(r["head"]), format_score(r["initial"]),
              format_score(r["final"])] + [format_score(r.get(k)) for k in extra] + [f"{r['wall_time_s']:.0f}"]
             for r in rows]
    by = {r["label"]: r for r in rows}
    notes = [f"Task {rows[0]['task']} on {rows[0]['model']}, {rows[0]['steps']} steps each; "
             "encoder params = adapter parameters (LoRTA, LoRA), all encoder weights (full), none (head only); "
             "the head is trained in every row."]
    if "lorta-r4" in by and "lora-r8" in by and by["lorta-r4"]["adapter"]:
        a, b = by["lorta-r4"], by["lora-r8"]
        notes.append(f"LoRTA r=4 has {b['adapter'] / a['adapter']:.0f}× fewer adapter parameters than LoRA r=8 "
                     f"({a['adapter']:,} vs {b['adapter']:,}); {metric} {format_score(a['final'])} vs "
                     f"{format_score(b['final'])} ({100 * (a['final'] - b['final']):+.1f} points).")
    if "head-only" in by:
        best = max((r for r in rows if r["method"] != "none"), key=lambda r: r["final"], default=None)
        if best:
            notes.append(f"head only: {format_score(by['head-only']['final'])}; best adapted: {best['label']} "
                         f"{format_score(best['final'])}.")
    text = f"# {rows[0]['task']}: trainable parameters and {metric}\n\n" + markdown_table(header, table) + "\n\n" + \
        "\n".join(f"* {n}" for n in notes) + "\n"
    (out / "table.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot_metric_vs_parameters(rows, "final", out / "metric_vs_parameters.png",
                              title=f"{rows[0]['task']} ({rows[0]['model']})", ylabel=f"held-out {metric}")
    return out / "table.md"
