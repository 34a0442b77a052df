"""What the α search and the sweep write for people: their vocabulary, markdown tables and the plot.

    SEARCH/search.md   paper Table 6 form (Model | α | Validation LDDT-Cα) and every candidate
    SWEEP/sweep.md     every entry; SWEEP/sweep.png validation LDDT-Cα against trainable adapter
                       parameters (log scale), as the paper's Figure 5
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ...adapters import METHODS
from ...eval.baselines import margin_text
from ...runtime.errors import COMPLETED, DIVERGED, INTERRUPTED, RUNNING  # noqa: F401  (the statuses used here too)
from ...runtime.text import format_count, format_score, markdown_table

ADAPTED = METHODS  # the methods that have an α: the adapter registry's (lorta, lora)

# search.json `status`, beside the run statuses running and interrupted
CHOSEN, ALL_DIVERGED = "chosen", "all_diverged"

CHOICE_RULE = ("the converged candidate with the best final validation LDDT-Cα; ties go to the larger α; "
               "the search stops at the first stage with a converged candidate")
METHOD_NAMES = {"lorta": "LoRTA", "lora": "LoRA", "none": "frozen LM (no adapter)", "full": "full fine-tuning"}


def fmt_alpha(alpha: float) -> str:
    return f"{alpha:.10g}"


def fmt_lddt(x: Optional[float]) -> str:
    return format_score(x, missing="—")


def model_label(adapter: str, rank: Optional[int]) -> str:
    """As the paper's Table 6: 'LoRTA (r = 8)'."""
    return f"{METHOD_NAMES[adapter]} (r = {rank})" if adapter in ADAPTED else METHOD_NAMES[adapter]


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
             fmt_lddt(c["val_lddt_ca_final"]), format_count(c["trainable_parameters"]["adapter"]),
             format_count(c["trainable_parameters"]["total"]), f"{c['steps']}/{c['target_steps']}",
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


def baselines_line(records: Sequence[dict], value: Optional[float]) -> list[str]:
    """A report line on the sequence-only baselines of the runs' validation chains, with `value`'s margin above
    the better one (every run of a search or sweep validates on the same chains); none without baselines."""
    base = next((r.get("val_baselines") for r in records if r.get("val_baselines")), None)
    if not base or value is None:
        return []
    return [f"* Beside structures built from the length alone on the same {base['n_chains']} validation chain(s) "
            f"(docs/method.md), the best {margin_text(value, base)}."]


def search_markdown(state: dict) -> str:
    chosen = state["chosen"]
    no_alpha = (f"all diverged (α ≥ {fmt_alpha(state['floor'])})" if state["status"] == ALL_DIVERGED
                else state["status"])
    return "\n".join([
        f"# α search: {state['model']}, config `{state['config']}`, {state['steps']} steps",
        "",
        f"**Result: {search_result_text(state)}.**",
        "",
        f"* Schedule (docs/method.md §3, paper App. D.4): {state['schedule']}.",
        f"* Choice: {state['choice_rule']}.",
        f"* Divergence (the trainer's rule): {state['divergence_rule']}.",
        f"* Training wall time, all candidates: {state['wall_time_s']:.1f} s.",
        *baselines_line(state["candidates"], chosen["val_lddt_ca_final"] if chosen else None),
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
             format_count(e["trainable_parameters"]["adapter"]), format_count(e["trainable_parameters"]["language_model"]),
             format_count(e["trainable_parameters"]["total"]), fmt_lddt(e["val_lddt_ca_initial"]),
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
        *baselines_line(entries, max((e["val_lddt_ca_final"] for e in entries if e["val_lddt_ca_final"] is not None),
                                     default=None)),
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
