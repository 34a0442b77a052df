"""Sweeps over adapters × ranks: each entry trained with its own staged α search or a given α.

A sweep (`run_sweep`) runs several entries (adapter:rank, plus `none` and `full`, the two ends of
the comparison) into `sweep.json`, `sweep.md` and `sweep.png` (validation LDDT-Cα against trainable
adapter parameters, as the paper's Figure 5). Like the search, it resumes where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc

from ...atomic import write_json_atomic
from ..run.config import ADAPTERS
from .search import (ADAPTED, CHOSEN, COMPLETED, DEFAULT_FLOOR, DEFAULT_MULTIPLIERS, INTERRUPTED,  # noqa: F401
                     RUNNING, SearchError, alpha_dir_name, alpha_search, candidate_config, check_multipliers,
                     check_validation_set, run_candidate)
from .search_report import fmt_alpha, model_label, plot_sweep, sweep_markdown

log = logging.getLogger("esmfold_peft.search")


def parse_runs(text: str) -> list[tuple[str, Optional[int]]]:
    """'lora:1,lorta:8,none,full' → [('lora', 1), ('lorta', 8), ('none', None), ('full', None)]."""
    entries = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        method, _, rank_text = item.partition(":")
        method = method.strip().lower()
        if method not in ADAPTERS:
            raise SearchError(f"sweep entry {item!r}: adapter must be one of {', '.join(ADAPTERS)}")
        if method in ADAPTED:
            if not rank_text.strip().isdigit() or int(rank_text) < 1:
                raise SearchError(f"sweep entry {item!r}: {method} needs a rank ≥ 1, as {method}:8")
            entry = (method, int(rank_text))
        elif rank_text:
            raise SearchError(f"sweep entry {item!r}: {method} takes no rank (write just {method!r})")
        else:
            entry = (method, None)
        if entry in entries:
            raise SearchError(f"sweep entry {item!r} is listed twice")
        entries.append(entry)
    if not entries:
        raise SearchError("no sweep entries given (e.g. --runs lora:1,lorta:8,none,full)")
    return entries


def entry_name(adapter: str, rank: Optional[int]) -> str:
    return f"{adapter}-r{rank}" if adapter in ADAPTED else adapter


def entry_from_run(adapter: str, rank: Optional[int], alpha: Optional[float], run_dir: str, summary: dict) -> dict:
    """A sweep entry from one training run (a given α, or none/full)."""
    divergence = summary.get("divergence") or {}
    return {
        "name": entry_name(adapter, rank), "model": model_label(adapter, rank), "adapter": adapter, "rank": rank,
        "alpha_mode": "given" if adapter in ADAPTED else "none", "alpha": alpha,
        "alphas_tried": [alpha] if alpha is not None else [], "status": summary["status"],
        "divergence_rule": divergence.get("rule"),
        "val_lddt_ca_initial": summary.get("val_lddt_ca_initial"),
        "val_lddt_ca_final": summary.get("val_lddt_ca_final"),
        "val_baselines": summary.get("val_baselines"),
        "trainable_parameters": summary["trainable_parameters"], "wall_time_s": summary["wall_time_s"],
        "run_dir": run_dir,
    }


def entry_from_search(state: dict, search_dir: str) -> dict:
    """A sweep entry from an α search: the chosen candidate's numbers, the whole search's wall time."""
    cands = state["candidates"]
    best = next((c for c in cands if state["chosen"] and c["alpha"] == state["chosen"]["alpha"]), None)
    shown = best or cands[-1]
    return {
        "name": entry_name(state["adapter"], state["rank"]), "model": state["model"], "adapter": state["adapter"],
        "rank": state["rank"], "alpha_mode": "search", "alpha": best["alpha"] if best else None,
        "alphas_tried": [c["alpha"] for c in cands],
        "status": {CHOSEN: COMPLETED}.get(state["status"], state["status"]),
        "divergence_rule": None if best else shown["divergence_rule"],
        "val_lddt_ca_initial": shown["val_lddt_ca_initial"],
        "val_lddt_ca_final": best["val_lddt_ca_final"] if best else None,
        "val_baselines": shown.get("val_baselines"),
        "trainable_parameters": shown["trainable_parameters"], "wall_time_s": state["wall_time_s"],
        "run_dir": f"{search_dir}/{best['run_dir']}" if best else None, "search_dir": search_dir,
    }


def run_sweep(base: mlc.ConfigDict, runs: Sequence[tuple[str, Optional[int]]], out_dir: Path,
              alpha: Optional[float] = None, search: bool = False,
              multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, floor: float = DEFAULT_FLOOR,
              progress: bool = True) -> dict:
    """Run (or resume) every entry: an α search each (`search`), or one run at the given `alpha`.

    Entry directories: OUT/<adapter>-r<rank>/ (a search directory; a given α trains its
    alpha-<α>/ candidate there too, so searches and given-α sweeps share runs), OUT/none/, OUT/full/.
    Returns the state written to sweep.json; `status` is `completed` or `interrupted`.
    """
    if search == (alpha is not None):
        raise SearchError("a sweep needs exactly one of: an α search, or a given α")
    if alpha is not None and alpha <= 0:
        raise SearchError(f"α must be positive, got {alpha}")
    check_validation_set(base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"config": base.name, "steps": base.train.steps,
             "alpha_mode": "search" if search else f"given α = {fmt_alpha(alpha)}",
             "multipliers": list(check_multipliers(multipliers)) if search else None,
             "floor": floor if search else None, "status": RUNNING, "entries": []}
    for i, (adapter, rank) in enumerate(runs):
        name = entry_name(adapter, rank)
        log.info("sweep entry %d of %d: %s", i + 1, len(runs), model_label(adapter, rank))
        if adapter in ADAPTED and search:
            result = alpha_search(base, adapter, rank, out_dir / name, multipliers, floor, progress)
            entry = entry_from_search(result, name)
        elif adapter in ADAPTED:
            run = f"{name}/{alpha_dir_name(alpha)}"
            entry = entry_from_run(adapter, rank, alpha, run,
                                   run_candidate(candidate_config(base, adapter, rank, alpha), out_dir / run, progress))
        else:
            entry = entry_from_run(adapter, None, None, name,
                                   run_candidate(candidate_config(base, adapter), out_dir / name, progress))
        state["entries"].append(entry)
        if entry["status"] == INTERRUPTED:
            state["status"] = INTERRUPTED
            break
        write_json_atomic(out_dir / "sweep.json", state)
    else:
        state["status"] = COMPLETED
    state["wall_time_s"] = round(sum(e["wall_time_s"] for e in state["entries"]), 2)
    (out_dir / "sweep.png").unlink(missing_ok=True)  # from an earlier invocation
    plot = plot_sweep(state["entries"], out_dir / "sweep.png", title=f"config {base.name}, {base.train.steps} steps")
    state["plot"] = plot.name if plot else None
    write_json_atomic(out_dir / "sweep.json", state)
    (out_dir / "sweep.md").write_text(sweep_markdown(state))
    return state

