"""The staged α-halving search of the paper's App. D.4 (SPEC §3), and sweeps over adapters × ranks.

For an adapter of rank r, stage 0 trains α = 256·r and 128·r and keeps the better by final validation
LDDT-Cα. If both diverge, stage 1 trains the next lower pair, 64·r and 32·r, and so on until a stage
has a converged candidate or every α of the next stage is below a floor. "Diverged" is the trainer's
logged rule (summary.json `diverged`, `divergence.rule`); a crash is an error, never a divergence.

Each candidate is an ordinary training run in its own directory, so a search is resumable: a
completed or diverged candidate is read back (after checking that its stored configuration is the
one requested), an interrupted one is resumed from its checkpoint.

    SEARCH/alpha-2048/   one run per candidate (config.json, checkpoints/, summary.json, …)
    SEARCH/search.json   the state, rewritten atomically after every candidate
    SEARCH/search.md     paper Table 6 form (Model | α | Validation LDDT-Cα) and every candidate

A sweep (`run_sweep`) runs several entries (adapter:rank, plus `none` and `full`, the two ends of
the comparison), each with its own α search or a given α, into `sweep.json`, `sweep.md` and
`sweep.png` (validation LDDT-Cα against trainable adapter parameters, as the paper's Figure 5).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc

from . import train as trainer
from .checkpoint import LAST, write_json_atomic
from .config import ADAPTERS, apply_overrides, load_config

log = logging.getLogger("esmfold_peft.search")

ADAPTED = ("lorta", "lora")  # the methods that have an α
DEFAULT_MULTIPLIERS = (256.0, 128.0)
DEFAULT_FLOOR = 1.0
# Config keys that cannot change a run's outcome; a stored candidate may differ from the request in these.
OUTCOME_NEUTRAL_KEYS = frozenset({"name", "train.log_every", "train.val_every", "train.ckpt_every",
                                  "train.num_threads", "data.num_workers"})
# Keys the search and sweep set themselves: --set must not touch them.
SEARCH_OWNED_KEYS = ("adapter.method", "adapter.rank", "adapter.alpha")

# search.json `status`
RUNNING, CHOSEN, ALL_DIVERGED, INTERRUPTED = "running", "chosen", "all_diverged", "interrupted"
# candidate `status`, as the trainer writes it in summary.json
COMPLETED, DIVERGED = "completed", "diverged"

CHOICE_RULE = ("the converged candidate with the best final validation LDDT-Cα; ties go to the larger α; "
               "the search stops at the first stage with a converged candidate")
METHOD_NAMES = {"lorta": "LoRTA", "lora": "LoRA", "none": "frozen LM (no adapter)", "full": "full fine-tuning"}


class SearchError(ValueError):
    """A search or sweep that cannot run as asked (bad schedule, mismatched stored run, …)."""


# Errors that mean a run cannot start as asked (one-line messages, exit status 2, as scripts/train_fold.py).
RUN_SETUP_ERRORS = (SearchError, *trainer.RUN_SETUP_ERRORS)


# --- the schedule and the decision rule (pure) ----------------------------------------------------

def check_multipliers(multipliers: Sequence[float]) -> tuple[float, ...]:
    """Distinct positive multipliers, largest first."""
    ms = tuple(sorted((float(m) for m in multipliers), reverse=True))
    if not ms or ms[-1] <= 0 or len(set(ms)) != len(ms):
        raise SearchError(f"α multipliers must be distinct positive numbers, got {list(multipliers)}")
    return ms


def parse_multipliers(text: str) -> tuple[float, ...]:
    """'256,128' → (256.0, 128.0), checked as `check_multipliers`."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SearchError(f"α multipliers must be comma-separated numbers such as 256,128, got {text!r}") from None
    return check_multipliers(values)


def stage_alphas(rank: int, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, stage: int = 0) -> list[float]:
    """The α values of one stage, largest first: multiplier·r / f**stage with f = 2·max/min.

    With the paper's (256, 128), f = 4: 256r, 128r → 64r, 32r → 16r, 8r → …, i.e. each stage halves
    on from the previous stage's smallest α, so no α is tried twice.
    """
    if rank < 1 or stage < 0:
        raise SearchError(f"need rank ≥ 1 and stage ≥ 0, got rank={rank}, stage={stage}")
    ms = check_multipliers(multipliers)
    factor = 2.0 * ms[0] / ms[-1]
    return [m * rank / factor ** stage for m in ms]


def stages(rank: int, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
           floor: float = DEFAULT_FLOOR) -> list[list[float]]:
    """Every stage down to the floor: the α values ≥ floor of each stage (the last may be partial)."""
    if floor <= 0:
        raise SearchError(f"the α floor must be positive, got {floor}")
    out = []
    while True:
        alphas = [a for a in stage_alphas(rank, multipliers, len(out)) if a >= floor]
        if not alphas:
            break
        out.append(alphas)
    if not out:
        raise SearchError(f"the floor α ≥ {fmt_alpha(floor)} is above the first stage "
                          f"({', '.join(fmt_alpha(a) for a in stage_alphas(rank, multipliers))}): nothing to train")
    return out


def converged(candidate: dict) -> bool:
    return candidate["status"] == COMPLETED and not candidate["diverged"]


def choose(candidates: Sequence[dict]) -> Optional[dict]:
    """The converged candidate with the best final validation LDDT-Cα; None when none converged.

    Ties (equal LDDT-Cα) go to the larger α: the paper found higher α better in this setting, and
    the larger α is the one the schedule tries first. A converged candidate without a validation
    score is an error (the search needs a validation set).
    """
    done = [c for c in candidates if converged(c)]
    for c in done:
        if c["val_lddt_ca_final"] is None:
            raise SearchError(f"candidate α={fmt_alpha(c['alpha'])} converged but has no validation LDDT-Cα: "
                              "the α search needs a validation set (data.val_dir, data.val_mmcif_dir or the demo)")
    if not done:
        return None
    return max(done, key=lambda c: (c["val_lddt_ca_final"], c["alpha"]))


# --- configs ------------------------------------------------------------------------------------

def search_base_config(config: str, overrides: Sequence[str] = (), steps: Optional[int] = None) -> mlc.ConfigDict:
    """A named config (or .py path) with `--set` overrides and `--steps`; the adapter keys are left to the search."""
    owned = [o for o in overrides if o.split("=", 1)[0].strip() in SEARCH_OWNED_KEYS]
    if owned:
        raise SearchError(f"{', '.join(owned)}: {', '.join(SEARCH_OWNED_KEYS)} are set by the search "
                          "(use --adapter/--rank, or --runs for a sweep)")
    cfg = load_config(config)
    apply_overrides(cfg, overrides)
    if steps is not None:
        apply_overrides(cfg, [f"train.steps={steps}"])
    return cfg


def check_validation_set(cfg: mlc.ConfigDict) -> None:
    """SearchError, before any training, when the config names no validation chains.

    Searches and sweeps compare runs by validation LDDT-Cα (rule: train.has_validation_set).
    """
    d = cfg.data
    if not trainer.has_validation_set(cfg):
        raise SearchError(f"runs are compared by validation LDDT-Cα, but data.source={d.source} has no validation "
                          "set: set data.val_dir (dir) or data.val_mmcif_dir (openfold)")


def candidate_config(base: mlc.ConfigDict, adapter: str, rank: Optional[int] = None,
                     alpha: Optional[float] = None) -> mlc.ConfigDict:
    """`base` with the adapter set: lorta/lora need rank and α; none/full take neither."""
    if adapter not in ADAPTERS:
        raise SearchError(f"adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
    cfg = copy.deepcopy(base)
    cfg.adapter.method = adapter
    if adapter in ADAPTED:
        if rank is None or alpha is None:
            raise SearchError(f"{adapter} needs a rank and an α")
        cfg.adapter.rank = int(rank)
        cfg.adapter.alpha = float(alpha)
    elif rank is not None or alpha is not None:
        raise SearchError(f"--adapter {adapter} has no rank and no α")
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = "<absent>"


def config_differences(requested: dict, stored: dict) -> list[str]:
    """'key: stored X, requested Y' for every key that differs, outcome-neutral keys aside."""
    def normal(d):  # as config.json stores it (tuples become lists, odd values strings)
        return _flatten(json.loads(json.dumps(d, default=str)))

    a, b = normal(requested), normal(stored)
    keys = sorted(k for k in set(a) | set(b) if k not in OUTCOME_NEUTRAL_KEYS)
    return [f"{k}: stored {b.get(k, _ABSENT)!r}, requested {a.get(k, _ABSENT)!r}"
            for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def check_stored_config(cfg: mlc.ConfigDict, run_dir: Path) -> None:
    """Raise SearchError when `run_dir` holds a run of another configuration than `cfg`."""
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        return
    requested = copy.deepcopy(cfg)
    trainer.resolve_paths(requested)  # config.json is written after the trainer resolves paths
    diffs = config_differences(requested.to_dict(), json.loads(stored_path.read_text()))
    if diffs:
        raise SearchError(f"{run_dir} holds a run of another configuration than the one requested:\n  "
                          + "\n  ".join(diffs)
                          + "\nrerun with the settings it was made with, or choose another --out")


# --- one candidate --------------------------------------------------------------------------------

def read_summary(run_dir: Path) -> Optional[dict]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_candidate(cfg: mlc.ConfigDict, run_dir: Path, progress: bool = True) -> dict:
    """Train `cfg` in `run_dir` unless it is already done there; return its summary.json.

    completed / diverged: read back, not retrained. Checkpoint present (interrupted): resumed.
    Started but without a checkpoint: started again (stale metrics dropped). The stored config
    must match `cfg` in every case (SearchError otherwise).
    """
    run_dir = Path(run_dir)
    check_stored_config(cfg, run_dir)
    summary = read_summary(run_dir)
    if summary is not None and summary["status"] in (COMPLETED, DIVERGED):
        log.info("  %s already %s: not retrained", run_dir, summary["status"])
        return summary
    resume = (run_dir / "checkpoints" / LAST).is_file()
    if resume:
        log.info("  resuming %s from its checkpoint", run_dir)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # from a start that left no checkpoint
        (run_dir / "summary.json").unlink(missing_ok=True)
    trainer.train(copy.deepcopy(cfg), run_dir, resume=resume, progress=progress)
    summary = read_summary(run_dir)
    if summary is None:
        raise SearchError(f"training in {run_dir} wrote no summary.json")
    return summary


def candidate_record(alpha: float, rank: int, stage: int, run_dir: str, summary: dict) -> dict:
    """What search.json keeps of one candidate."""
    divergence = summary.get("divergence") or {}
    return {
        "alpha": alpha, "multiplier": alpha / rank, "stage": stage, "run_dir": run_dir,
        "status": summary["status"], "diverged": bool(summary["diverged"]),
        "divergence_rule": divergence.get("rule"), "divergence_step": divergence.get("step"),
        "val_lddt_ca_initial": summary.get("val_lddt_ca_initial"),
        "val_lddt_ca_final": summary.get("val_lddt_ca_final"),
        "trainable_parameters": summary["trainable_parameters"],
        "steps": summary["steps"], "target_steps": summary.get("target_steps"),
        "wall_time_s": summary["wall_time_s"],
    }


def alpha_dir_name(alpha: float) -> str:
    return f"alpha-{fmt_alpha(alpha)}"


# --- the search -----------------------------------------------------------------------------------

def require_alpha(adapter: str) -> None:
    """SearchError unless `adapter` has an α (lorta, lora)."""
    if adapter not in ADAPTED:
        raise SearchError(f"--adapter {adapter} has no α to search (α scales the lorta/lora update); "
                          "train it directly with scripts/train_fold.py, or list it in scripts/sweep.py")


def alpha_search(base: mlc.ConfigDict, adapter: str, rank: int, search_dir: Path,
                 multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, floor: float = DEFAULT_FLOOR,
                 progress: bool = True) -> dict:
    """Run (or resume) the staged α search; return the state also written to search.json.

    The state's `status` is `chosen` (see `chosen`), `all_diverged` (every α down to the floor
    diverged) or `interrupted` (a candidate was stopped; run again to resume).
    """
    require_alpha(adapter)
    check_validation_set(base)
    multipliers = check_multipliers(multipliers)
    plan = stages(rank, multipliers, floor)
    search_dir = Path(search_dir)
    search_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model_label(adapter, rank), "adapter": adapter, "rank": rank, "config": base.name,
        "steps": base.train.steps, "multipliers": list(multipliers), "floor": floor,
        "schedule": schedule_text(multipliers, floor), "choice_rule": CHOICE_RULE, "divergence_rule": None,
        "status": RUNNING, "chosen": None, "candidates": [], "wall_time_s": 0.0,
    }
    n_planned = sum(len(s) for s in plan)
    for stage, alphas in enumerate(plan):
        for alpha in alphas:
            name = alpha_dir_name(alpha)
            log.info("α search %s: stage %d, candidate α=%s (%s·r), %d of at most %d, in %s",
                     state["model"], stage, fmt_alpha(alpha), fmt_alpha(alpha / rank),
                     len(state["candidates"]) + 1, n_planned, search_dir / name)
            summary = run_candidate(candidate_config(base, adapter, rank, alpha), search_dir / name, progress)
            record = candidate_record(alpha, rank, stage, name, summary)
            state["candidates"].append(record)
            state["divergence_rule"] = summary.get("divergence_rule")
            state["wall_time_s"] = round(sum(c["wall_time_s"] for c in state["candidates"]), 2)
            log.info("  α=%s: %s%s, validation LDDT-Cα %s → %s", fmt_alpha(alpha), record["status"],
                     f" ({record['divergence_rule']})" if record["diverged"] else "",
                     fmt_lddt(record["val_lddt_ca_initial"]), fmt_lddt(record["val_lddt_ca_final"]))
            if record["status"] not in (COMPLETED, DIVERGED):
                state["status"] = INTERRUPTED
                write_search(state, search_dir)
                return state
            write_json_atomic(search_dir / "search.json", state)
        best = choose(state["candidates"])
        if best is not None:
            state["status"] = CHOSEN
            state["chosen"] = {k: best[k] for k in ("alpha", "multiplier", "stage", "run_dir", "val_lddt_ca_final")}
            break
        if stage + 1 < len(plan):
            log.info("every candidate of stage %d diverged: halving on to α = %s", stage,
                     ", ".join(fmt_alpha(a) for a in plan[stage + 1]))
    else:
        state["status"] = ALL_DIVERGED
    write_search(state, search_dir)
    return state


def write_search(state: dict, search_dir: Path) -> None:
    write_json_atomic(search_dir / "search.json", state)
    (search_dir / "search.md").write_text(search_markdown(state))


def schedule_text(multipliers: Sequence[float], floor: float) -> str:
    first, second = (", ".join(f"{fmt_alpha(m)}·r" for m in stage_alphas(1, multipliers, s)) for s in (0, 1))
    return (f"stage 0 trains α = {first}; while every candidate of a stage diverges, the next stage halves on "
            f"({second}, …); α below the floor {fmt_alpha(floor)} is not trained")


# --- the sweep ------------------------------------------------------------------------------------

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


# --- tables and the plot --------------------------------------------------------------------------

def fmt_alpha(alpha: float) -> str:
    return f"{alpha:.10g}"


def fmt_lddt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_count(n: Optional[int]) -> str:
    return "—" if n is None else f"{n:,}"


def model_label(adapter: str, rank: Optional[int]) -> str:
    """As the paper's Table 6: 'LoRTA (r = 8)'."""
    return f"{METHOD_NAMES[adapter]} (r = {rank})" if adapter in ADAPTED else METHOD_NAMES[adapter]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table6(rows: Sequence[tuple[str, Optional[float], Optional[float], str]]) -> str:
    """Paper Table 6 form. rows: (model, α or None, validation LDDT-Cα or None, what to show without α)."""
    return markdown_table(["Model", "α", "Validation LDDT-Cα"],
                          [(m, fmt_alpha(a) if a is not None else no_alpha, fmt_lddt(v)) for m, a, v, no_alpha in rows])


def outcome(record: dict) -> str:
    if record["status"] == DIVERGED:
        step = record.get("divergence_step")
        return f"diverged{f' at step {step}' if step is not None else ''}: {record['divergence_rule']}"
    return record["status"]


def candidates_table(state: dict) -> str:
    chosen = (state["chosen"] or {}).get("alpha")
    rows = [(c["stage"], fmt_alpha(c["alpha"]) + (" (chosen)" if c["alpha"] == chosen else ""),
             f"{fmt_alpha(c['multiplier'])}·r", outcome(c), fmt_lddt(c["val_lddt_ca_initial"]),
             fmt_lddt(c["val_lddt_ca_final"]), fmt_count(c["trainable_parameters"]["adapter"]),
             fmt_count(c["trainable_parameters"]["total"]), f"{c['steps']}/{c['target_steps']}",
             f"{c['wall_time_s']:.1f}", c["run_dir"]) for c in state["candidates"]]
    return markdown_table(["stage", "α", "α/r", "outcome", "val LDDT-Cα initial", "val LDDT-Cα final",
                           "adapter params", "total trainable", "steps", "wall time (s)", "run"], rows)


def search_result_text(state: dict) -> str:
    if state["status"] == CHOSEN:
        c = state["chosen"]
        return (f"chosen α = {fmt_alpha(c['alpha'])} ({fmt_alpha(c['multiplier'])}·r, stage {c['stage']}), "
                f"validation LDDT-Cα {fmt_lddt(c['val_lddt_ca_final'])}")
    if state["status"] == ALL_DIVERGED:
        return f"all diverged down to the floor α ≥ {fmt_alpha(state['floor'])}: no α chosen"
    return f"{state['status']}: run the same command again to resume"


def search_markdown(state: dict) -> str:
    chosen = state["chosen"]
    no_alpha = (f"all diverged (α ≥ {fmt_alpha(state['floor'])})" if state["status"] == ALL_DIVERGED
                else state["status"])
    return "\n".join([
        f"# α search: {state['model']}, config `{state['config']}`, {state['steps']} steps",
        "",
        f"**Result: {search_result_text(state)}.**",
        "",
        f"* Schedule (SPEC §3, paper App. D.4): {state['schedule']}.",
        f"* Choice: {state['choice_rule']}.",
        f"* Divergence (the trainer's rule): {state['divergence_rule']}.",
        f"* Training wall time, all candidates: {state['wall_time_s']:.1f} s.",
        "",
        "## Selected (paper Table 6 form)",
        "",
        table6([(state["model"], chosen["alpha"] if chosen else None, chosen["val_lddt_ca_final"] if chosen else None,
                 no_alpha)]),
        "## Every candidate",
        "",
        candidates_table(state),
    ])


def _entry_status(e: dict) -> str:
    if e["status"] == ALL_DIVERGED:
        return "all α diverged"
    if e["status"] == DIVERGED:
        return f"diverged: {e['divergence_rule']}"
    return e["status"]


def sweep_markdown(state: dict) -> str:
    entries = state["entries"]
    t6 = [(e["model"], e["alpha"], e["val_lddt_ca_final"],
           "—" if e["adapter"] not in ADAPTED else _entry_status(e)) for e in entries]
    rows = [(e["model"], e["adapter"], e["rank"] if e["rank"] is not None else "—",
             fmt_alpha(e["alpha"]) if e["alpha"] is not None else "—",
             ", ".join(fmt_alpha(a) for a in e["alphas_tried"]) or "—",
             fmt_count(e["trainable_parameters"]["adapter"]), fmt_count(e["trainable_parameters"]["language_model"]),
             fmt_count(e["trainable_parameters"]["total"]), fmt_lddt(e["val_lddt_ca_initial"]),
             fmt_lddt(e["val_lddt_ca_final"]), _entry_status(e), f"{e['wall_time_s']:.1f}",
             e.get("search_dir") or e["run_dir"] or "—") for e in entries]
    alpha_line = ("α per entry by the staged search (see each entry's search.md)" if state["alpha_mode"] == "search"
                  else state["alpha_mode"])
    return "\n".join([
        f"# Sweep: config `{state['config']}`, {state['steps']} steps",
        "",
        f"* α: {alpha_line}; status: {state['status']}.",
        f"* Training wall time, all runs: {state.get('wall_time_s', 0.0):.1f} s.",
        "* Validation LDDT-Cα: final, OpenFold convention (pooled per chain, averaged over chains).",
        "",
        "## Paper Table 6 form",
        "",
        table6(t6),
        "## Every entry",
        "",
        markdown_table(["Model", "adapter", "rank", "α (chosen)", "α tried", "adapter params", "LM params trained",
                        "total trainable", "val LDDT-Cα initial", "val LDDT-Cα final", "status",
                        "wall time (s), all α tried", "directory"], rows),
        f"![validation LDDT-Cα against trainable adapter parameters]({state['plot']})\n" if state.get("plot") else
        "No plot: no entry converged with a validation score.\n",
    ])


def plot_sweep(entries: Sequence[dict], path: Path, title: str = "") -> Optional[Path]:
    """Validation LDDT-Cα against trainable adapter parameters (log x), as the paper's Figure 5.

    lorta/lora: one line per method across ranks; `none` (0 adapter parameters): a horizontal
    reference line; `full`: a point at the number of language-model parameters it trains.
    None (nothing written) when no entry converged with a score.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, PNGs render with Agg

    scored = [e for e in entries if e["val_lddt_ca_final"] is not None]
    if not scored:
        return None
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    markers = {"lorta": "o", "lora": "s", "full": "*"}
    for method in ADAPTED:
        pts = sorted((e["trainable_parameters"]["adapter"], e["val_lddt_ca_final"], e["rank"], e["alpha"])
                     for e in scored if e["adapter"] == method)
        if pts:
            xs, ys, _, _ = zip(*pts)
            ax.plot(xs, ys, marker=markers[method], label=METHOD_NAMES[method])
            for x, y, r, a in pts:
                ax.annotate(f"r={r}, α={fmt_alpha(a)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for e in scored:
        if e["adapter"] == "full":
            ax.plot([e["trainable_parameters"]["language_model"]], [e["val_lddt_ca_final"]], ls="none",
                    marker=markers["full"], markersize=11, color="black", label="full fine-tuning (LM parameters)")
        elif e["adapter"] == "none":
            ax.axhline(e["val_lddt_ca_final"], color="grey", ls="--", lw=1, label="frozen LM (0 adapter parameters)")
    if not any(e["adapter"] in (*ADAPTED, "full") for e in scored):  # only the reference line: give x a range
        ax.set_xlim(1, 1e6)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the r/α labels
    ax.set_xlabel("trainable adapter parameters (log scale)")
    ax.set_ylabel("validation LDDT-Cα")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
