"""The staged α-halving search of the paper's App. D.4 (docs/method.md §3), and sweeps over adapters × ranks.

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

Sweeps over adapters × ranks are in `sweep.py`; the tables and the plot in `search_report.py`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc

from ...atomic import write_json_atomic
from ...runtime.config import describe_differences, differences
from ...runtime.errors import UserError
from ...runtime.rundir import RunDir
from .. import train as trainer
from ..run.config import ADAPTERS, apply_overrides, load_config
from ..run.resolve import finish, stored_form
from .search_report import (ADAPTED, ALL_DIVERGED, CHOICE_RULE, CHOSEN, COMPLETED, DIVERGED, INTERRUPTED,  # noqa: F401
                            METHOD_NAMES, RUNNING, fmt_alpha, fmt_lddt, model_label, search_markdown)

log = logging.getLogger("esmfold_peft.search")

DEFAULT_MULTIPLIERS = (256.0, 128.0)
DEFAULT_FLOOR = 1.0
# Config keys that cannot change a run's outcome; a stored candidate may differ from the request in these.
OUTCOME_NEUTRAL_KEYS = frozenset({"name", "train.log_every", "train.val_every", "train.ckpt_every",
                                  "train.num_threads", "data.num_workers"})
# Keys the search and sweep set themselves: --set must not touch them.
SEARCH_OWNED_KEYS = ("adapter.method", "adapter.rank", "adapter.alpha")

class SearchError(UserError, ValueError):
    """A search or sweep that cannot run as asked (bad schedule, mismatched stored run, …)."""




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


def check_stored_config(cfg: mlc.ConfigDict, run_dir: Path) -> None:
    """Raise SearchError when `run_dir` holds a run of another configuration than `cfg`."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        return
    requested = stored_form(finish(copy.deepcopy(cfg)), run.path)
    diffs = [d for d in differences(run.read_config(), requested) if d[0] not in OUTCOME_NEUTRAL_KEYS]
    if diffs:
        raise SearchError(f"{run_dir} holds a run of another configuration than the one requested: "
                          f"{describe_differences(diffs)}; rerun with the settings it was made with, "
                          "or choose another --out")


# --- one candidate --------------------------------------------------------------------------------

def read_summary(run_dir: Path) -> Optional[dict]:
    run = RunDir(run_dir)
    return run.read_summary() if run.summary.is_file() else None


def run_candidate(cfg: mlc.ConfigDict, run_dir: Path, progress: bool = True) -> dict:
    """Train `cfg` in `run_dir` unless it is already done there; return its summary.json.

    completed / diverged: read back, not retrained. Started before (interrupted): resumed, from its
    checkpoint or from step 0. A failed start is started again. The stored config must match `cfg`
    in every case (SearchError otherwise).
    """
    run_dir = Path(run_dir)
    check_stored_config(cfg, run_dir)
    summary = read_summary(run_dir)
    if summary is not None and summary["status"] in (COMPLETED, DIVERGED):
        log.info("  %s already %s: not retrained", run_dir, summary["status"])
        return summary
    resume = RunDir(run_dir).config.is_file() and (summary or {}).get("status") != "failed"
    if resume:  # from its checkpoint, or from step 0 when it stopped before the first one
        log.info("  resuming %s", run_dir)
    trainer.train(finish(copy.deepcopy(cfg)), run_dir, resume=resume, progress=progress)
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
        "val_baselines": summary.get("val_baselines"),
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
