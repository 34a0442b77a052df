#!/usr/bin/env python
"""Demonstrate fine-tuning a pretrained ESMFold with LoRTA on a family it never saw, on CPU.

One command, six stages, each in its own directory under --out: synthetic families made from TS50
chains (families/), a base model trained here from scratch on some of them (base/), that model
exported in fair-esm's ESMFold format (base_esmfold.pt), fine-tuned from the file with LoRTA on the
language model and the trunk, everything else frozen, on a new family (finetune/), the same with the
confidence heads trained too (finetune_heads/), and the held-out variants of the new and the old
families predicted and scored before and after (eval/): LDDT-Cα beside sequence-only baselines, and
how well pLDDT is calibrated. The table goes to results.md and results.json and is printed at the end.

The new family is by default distant: variants of a base family's parent with 60% of residues
substituted (sequences the base never saw, on a fold it knows: the usual reason to fine-tune
ESMFold). --new-family unseen puts it on a fold the base never saw.

Rerunning the same command skips the finished stages and continues an interrupted run from its
checkpoint; other settings need another --out. The families are synthetic (sequence variants on
their parent's backbone; see docs/finetune.md), so the numbers show the mechanics of the recipe,
not what fine-tuning does for a real protein family.

Examples:
  python scripts/demo_finetune.py                                   # runs/demo-finetune (about 30 min on 2 CPU cores)
  python scripts/demo_finetune.py --out runs/ft-unseen --new-family unseen --new-rate 0.3   # a fold the base never saw
  python scripts/demo_finetune.py --smoke --out /tmp/ft-smoke       # every stage on the tiniest shapes (seconds)
"""


# --- how it works ------------------------------------------------------------------------------
# A CPU demonstration of the fine-tuning recipe: a base ESMFold trained here, exported in fair-esm's
# format, fine-tuned through LoRTA on a family it never saw, measured before and after.
#
# The new family is by default a *distant* family (`new_family="distant"`): variants of the first base
# parent at a higher substitution rate (`new_rate`, 0.6), so sequences the base never saw, at about 40%
# identity to a fold it knows; that is the usual case of fine-tuning ESMFold (a family it folds with
# low accuracy, on folds the PDB holds). `new_family="clade"` makes it a clade: one ancestor at
# `new_rate` from the first base parent, and variants of that ancestor at `rate`, so the family's members
# share the ancestor's residues (as a real family shares its substitutions; the distant kind's variants
# are independent draws, related only through the base parent). `new_family="unseen"` puts the new family on a parent the
# base never saw instead: a new fold, which adapters alone did not teach a model this small (docs/finetune.md).
#
#     run_demo(DemoSettings(), Path("runs/demo-finetune"))      # scripts/demo_finetune.py
#
# Stages, each in its own directory under the output directory (rerunning skips the finished ones
# and continues an interrupted run from its checkpoint):
#
# 1. `families/`: synthetic sequence families (`data.families`) from the shortest usable TS50
#    chains: variants of `n_families` parents at `rate` for the base model (`families/base`), and the
#    new family (`families/new`): variants at `new_rate` of the first base parent (distant) or of
#    one more parent (unseen); each set has train/ and val/ (held-out variants);
# 2. `base/`: a folding model trained from scratch on the base families (the demo's trunk, its
#    ESM-2 8M frozen), the `demo` config with `data.source=dir`;
# 3. `base_esmfold.pt`: that model exported to fair-esm's ESMFold format (`export_esmfold_checkpoint`);
# 4. `finetune/`: fine-tuned from that file (`model.init_from`) on the new family's training variants
#    with LoRTA on the language model and the trunk (`adapter.scope=both`, `model.trainable=""`: the
#    trunk, structure module, embeddings and heads stay frozen); `finetune_heads/`: the same with the
#    confidence heads trained too (`model.trainable=confidence` at `optim.confidence_lr`);
# 5. `eval/`: the held-out variants of the new family and of the base families predicted (by
#    `predict.predict_fasta`, the fine-tuned adapter merged) and scored (`eval.evaluate_paths`) with
#    the base file and with the fine-tuned run.
#
# `results.json` and `results.md` hold the table: LDDT-Cα (and its margin above the sequence-only
# baselines), mean pLDDT, its calibration error (ECE) and correlation, before and after, heads frozen and
# trained, on the new family and on the old ones (forgetting), trainable parameters, wall and CPU seconds.


from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from esmfold_peft.atomic import atomic_write, write_json_atomic
from esmfold_peft.data import families as fam
from esmfold_peft.data.demo import ensure_demo_data
from esmfold_peft.data.structures import iter_structures
from esmfold_peft.fold.predict.library import DEFAULT_THRESHOLD
from esmfold_peft.runtime.cli import exit_code_table, non_negative_int, positive_float, positive_int, run_main
from esmfold_peft.runtime.errors import COMPLETED, EXIT_OK, UserError
from esmfold_peft.runtime.rundir import RunDir, ensure_writable_dir
from esmfold_peft.runtime.text import format_score

log = logging.getLogger("esmfold_peft.finetune_demo")

STATE = "demo.json"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
BASE_FILE = "base_esmfold.pt"
FORMAT = 1
NEW_FAMILY_KINDS = ("distant", "unseen", "clade")
LIBRARY, ADAPTER_ENTRY = "library", "new_family"  # the adapter library the routed model serves, and its entry
# the trunk of a --smoke demonstration: the tiniest shapes, seconds per stage
SMOKE_TRUNK = ("model.trunk.num_blocks=1", "model.trunk.sequence_state_dim=32", "model.trunk.pairwise_state_dim=16",
               "model.trunk.sequence_head_width=16", "model.trunk.pairwise_head_width=8",
               "model.trunk.structure_module.c_s=32", "model.trunk.structure_module.c_z=16",
               "model.trunk.structure_module.no_blocks=1", "model.trunk.structure_module.no_heads_ipa=2",
               "model.trunk.structure_module.c_ipa=8", "model.trunk.structure_module.c_resnet=16",
               "model.lddt_head_hid_dim=16")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demonstration's numbers (a rerun must give the same ones)."""

    n_families: int = 2  # base families
    max_parent_length: int = 100
    rate: float = 0.3  # fraction of residues substituted in each variant of a base family
    new_family: str = "distant"  # distant: on the first base parent's fold; unseen: on one more parent; clade: see
    # make_families
    new_rate: float = 0.6  # fraction of residues substituted in each variant of the new family
    base_train_variants: int = 8
    base_val_variants: int = 5  # 10 held-out chains over the base families: enough for a correlation
    new_train_variants: int = 8
    new_val_variants: int = 12
    seed: int = 0
    base_steps: int = 1500
    base_lr: float = 1e-3
    finetune_steps: int = 300
    finetune_lr: float = 2e-2
    confidence_lr: float = 1e-2  # the pLDDT/pTM heads' rate in the heads-trained fine-tuning (1e-3 halved ECE less)
    rank: int = 32
    alpha: float = 0.0  # 0: alpha = rank
    batch_size: int = 1
    clip_grad_norm: float = 1.0
    crop_size: int = 128  # above max_parent_length: whole chains
    num_recycles: int = 0  # in training (max), validation and the measured predictions alike
    val_every: int = 100
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    extra: tuple = ()  # further `key=value` overrides for both runs (e.g. a smaller trunk)

    @classmethod
    def smoke(cls, **changes) -> "DemoSettings":
        """The tiniest demonstration: every stage runs, in seconds; its numbers mean nothing."""
        values = dict(n_families=2, base_train_variants=2, base_val_variants=1, new_train_variants=2,
                      new_val_variants=1, base_steps=2, finetune_steps=2, rank=2, crop_size=16, num_recycles=0,
                      val_every=0, threads=1, extra=SMOKE_TRUNK)
        values.update(changes)
        return cls(**values)

    def __post_init__(self):
        if self.new_family not in NEW_FAMILY_KINDS:
            raise ValueError(f"new_family must be one of {', '.join(NEW_FAMILY_KINDS)}, got {self.new_family!r}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"] = list(self.extra)
        return d


class _Clock:
    """Wall and process CPU seconds of each stage, kept in demo.json across reruns (a stage finished
    before keeps the time of the session that finished it)."""

    def __init__(self, state_path: Path, state: dict):
        self.path, self.state = state_path, state

    def done(self, name: str) -> bool:
        return name in self.state["stages"]

    def run(self, name: str, work: Callable[[], object]):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        self.state["stages"][name] = {"wall_s": round(time.perf_counter() - wall, 1),
                                      "cpu_s": round(time.process_time() - cpu, 1)}
        write_json_atomic(self.path, self.state)
        return result


def _read_state(out: Path, settings: DemoSettings) -> dict:
    path = out / STATE
    wanted = {"format": FORMAT, "settings": settings.as_dict()}
    if not path.is_file():
        return {**wanted, "stages": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: damaged ({exc}); remove it to start the demonstration again") from exc
    if state.get("settings") != wanted["settings"]:
        old, new = state.get("settings") or {}, wanted["settings"]
        diff = ", ".join(f"{k}={old.get(k)!r} (asked: {new[k]!r})" for k in new if old.get(k) != new[k])
        raise UserError(f"{out} holds a demonstration with other settings: {diff}; choose another --out")
    state.setdefault("stages", {})
    return state


# --- the stages -----------------------------------------------------------------------------------

def make_families(settings: DemoSettings, demo_root: Optional[Path], out: Path) -> dict:
    """The base and new family sets under out/families (unchanged sets are left as they are)."""
    paths = ensure_demo_data(demo_root, log=lambda m: log.info("demo data: %s", m))  # fetched if missing
    chains = list(iter_structures(paths.structure_files()))
    unseen = settings.new_family == "unseen"
    parents = fam.choose_parents(chains, settings.n_families + unseen, settings.max_parent_length)
    base = parents[:settings.n_families]
    new, new_rate = (parents[-1:] if unseen else parents[:1]), settings.new_rate
    if settings.new_family == "clade":  # one ancestor at new_rate from the first base parent, variants of it at rate
        positions, residues = fam.substitution_draw(parents[0], settings.new_rate, settings.seed + 2, 0)
        new, new_rate = [fam.substituted(parents[0], positions, residues, f"{parents[0].name}_clade")], settings.rate
    return {
        "base": fam.write_families(base, out / "families" / "base", n_train=settings.base_train_variants,
                                   n_val=settings.base_val_variants, rate=settings.rate, seed=settings.seed),
        "new": fam.write_families(new, out / "families" / "new", n_train=settings.new_train_variants,
                                  n_val=settings.new_val_variants, rate=new_rate, seed=settings.seed + 1),
    }


def run_overrides(settings: DemoSettings, out: Path, family: str) -> list[str]:
    data = out / "families" / family
    return ["data.source=dir", f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}",
            f"data.cache_dir={out / 'cache' / family}", f"train.crop_size={settings.crop_size}",
            f"train.batch_size={settings.batch_size}", f"train.effective_batch_size={settings.batch_size}",
            f"optim.clip_grad_norm={settings.clip_grad_norm}", f"train.max_recycles={settings.num_recycles}",
            f"val.num_recycles={settings.num_recycles}", f"train.val_every={settings.val_every}",
            f"train.ckpt_every={settings.val_every}", f"train.num_threads={settings.threads}",
            f"train.seed={settings.seed}", *settings.extra]


def base_overrides(settings: DemoSettings, out: Path) -> list[str]:
    return ["adapter.method=none", f"train.steps={settings.base_steps}", f"optim.lr={settings.base_lr}",
            *run_overrides(settings, out, "base")]


def finetune_overrides(settings: DemoSettings, out: Path, heads: bool = False) -> list[str]:
    """The fine-tuning run: LoRTA on LM and trunk, the rest frozen; with `heads`, the confidence heads trained too."""
    warmup = max(1, settings.finetune_steps // 10)
    trainable = ["model.trainable=confidence", f"optim.confidence_lr={settings.confidence_lr}"] if heads else \
        ["model.trainable="]
    return ["adapter.method=lorta", "adapter.scope=both", f"adapter.rank={settings.rank}",
            f"adapter.alpha={settings.alpha}", *trainable, f"model.init_from={out / BASE_FILE}",
            f"train.steps={settings.finetune_steps}", f"optim.lr={settings.finetune_lr}",
            f"optim.warmup_steps={warmup}", *run_overrides(settings, out, "new")]


def train_command(overrides: Sequence[str], run_dir: Path) -> str:
    """The scripts/train_fold.py command line that trains the same run."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return f"python scripts/train_fold.py --config demo {sets} --out {shlex.quote(str(run_dir))}"


def run_stage_done(run_dir: Path, steps: int) -> bool:
    run = RunDir(run_dir)
    if run.status() != COMPLETED:
        return False
    return int(run.read_summary().get("steps", 0)) >= steps


def train_stage(overrides: Sequence[str], run_dir: Path, progress: bool) -> None:
    """Train a new run, or continue the one in `run_dir` (interrupted, or shorter than asked)."""
    from esmfold_peft.fold.run.resolve import new_run_config, resume_run_config
    from esmfold_peft.fold.train import train

    run = RunDir(run_dir)
    if run.holds_run() and run.status() != "failed":
        steps = [o for o in overrides if o.startswith("train.steps=")]
        cfg = resume_run_config(run_dir, steps)
        status = train(cfg, run_dir, resume=True, progress=progress)
    else:
        status = train(new_run_config("demo", overrides), run_dir, progress=progress)
    if status != EXIT_OK:
        summary = run.read_summary() if run.summary.is_file() else {}
        raise UserError(f"{run_dir}: training ended with status {summary.get('status', status)}"
                        f"{': ' + summary['reason'] if summary.get('reason') else ''}; rerun to continue it")


def export_stage(base_dir: Path, out_file: Path) -> dict:
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint

    model, cfg = load_trained_model(base_dir)
    return export_esmfold_checkpoint(model, cfg, out_file)


def _completed_prediction(pred_dir: Path, n: int) -> bool:
    try:
        summary = json.loads((pred_dir / "predictions.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("status") == "completed" and summary.get("n_predicted") == n


MODELS = {"base": None, "finetuned": "finetune", "finetuned_heads": "finetune_heads",  # model -> its run directory
          "routed": None}  # the base file serving a library of the fine-tuned adapter, --adapter auto
MODEL_LABELS = {"base": "base (exported file)", "finetuned": "fine-tuned, heads frozen",
                "finetuned_heads": "fine-tuned, heads trained", "routed": "base + adapter library, auto-routed"}


def library_stage(out: Path) -> Path:
    """out/library: one entry, the fine-tuned run's adapter folders (with the sketch of its training sequences)."""
    entry = out / LIBRARY / ADAPTER_ENTRY
    for name in ("adapter", "trunk_adapter"):
        if (out / "finetune" / name).is_dir():
            shutil.copytree(out / "finetune" / name, entry / name, dirs_exist_ok=True)
    return out / LIBRARY


def routing(where: Path, family: str) -> dict:
    """How --adapter auto routed a family's held-out variants (right: the new family's to its adapter, the base
    families' to the base)."""
    records = json.loads((where / "predictions.json").read_text())["predictions"]
    want = ADAPTER_ENTRY if family == "new" else "base"
    to_adapter = sum(r["adapter"] == ADAPTER_ENTRY for r in records)
    return {"n": len(records), "to_adapter": to_adapter, "to_base": len(records) - to_adapter,
            "accuracy": sum(r["adapter"] == want for r in records) / max(1, len(records)),
            "scores": [r["routing"]["score"] for r in records]}


def measure(out: Path, model: str, family: str, settings: DemoSettings, lm: str, progress: bool) -> dict:
    """Predict a family set's held-out variants with `model` (a key of MODELS) and score them: accuracy, its
    margin above the sequence-only baselines, and the calibration of pLDDT."""
    from esmfold_peft.eval.evaluate import evaluate_paths
    from esmfold_peft.eval.report import summarize
    from esmfold_peft.fold.predict import predict_fasta
    from esmfold_peft.fold.predict.library import LibraryOptions

    data = out / "families" / family
    where = out / "eval" / f"{model}-on-{family}"
    n = len((data / "val.fasta").read_text().split(">")) - 1
    if not _completed_prediction(where / "predictions", n):
        if model in ("base", "routed"):
            library = LibraryOptions(library_stage(out), "auto") if model == "routed" else None
            predict_fasta(data / "val.fasta", None, where / "predictions", esmfold=out / BASE_FILE, lm=lm,
                          num_recycles=settings.num_recycles, device="cpu", progress=progress, library=library)
        else:
            predict_fasta(data / "val.fasta", out / MODELS[model], where / "predictions",
                          num_recycles=settings.num_recycles, device="cpu", progress=progress)
    run = evaluate_paths(where / "predictions", data / "val", where / "report", plots=False, progress=progress)
    if run.failures:
        raise UserError(f"{where / 'report'}: {len(run.failures)} chain(s) could not be scored: {run.failures[0]}")
    overall = summarize(run.chains)
    predictions = json.loads((where / "predictions" / "predictions.json").read_text())
    check = predictions.get("merge_check") or {}
    cal = overall["calibration"]
    return {"model": model, "family": family, "n_chains": overall["n_chains"],
            "lddt_ca": overall["lddt_ca_global_pooled_mean_over_chains"],
            "lddt_ca_margin": overall["margins"]["lddt_ca"],
            "mean_plddt": overall["mean_plddt_mean_over_chains"],
            "ece": cal["per_residue"]["ece"], "n_residues": cal["per_residue"]["n"],
            "pearson_r": cal["per_chain"]["pearson_r"], "spearman_rho": cal["per_chain"]["spearman_rho"],
            "correlation_caveat": cal["per_chain"]["caveat"],
            "tm_score": overall["tm_score_mean_over_chains"], "rmsd_ca": overall["rmsd_ca_mean_over_chains"],
            "adapter_merged": bool(predictions.get("adapter_merged")),
            "merge_max_deviation_angstrom": check.get("max_position_deviation_angstrom"),
            "routing": routing(where / "predictions", family) if model == "routed" else None,
            "report": str(where / "report" / "report.json")}


# --- the whole demonstration ----------------------------------------------------------------------

def run_demo(settings: DemoSettings, out: Path, demo_root: Optional[Path] = None, progress: bool = True) -> dict:
    """Run (or continue) every stage and write results.json / results.md into `out`; return the results."""
    out = ensure_writable_dir(Path(out))
    state = _read_state(out, settings)
    clock = _Clock(out / STATE, state)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    manifests = {f: fam.read_manifest(out / "families" / f) for f in ("base", "new")}
    if clock.done("families") and all(manifests.values()):
        families = manifests
    else:
        families = clock.run("families", lambda: make_families(settings, demo_root, out))

    base_cmd, ft_cmd = base_overrides(settings, out), finetune_overrides(settings, out)
    heads_cmd = finetune_overrides(settings, out, heads=True)
    if not (clock.done("base") and run_stage_done(out / "base", settings.base_steps)):
        clock.run("base", lambda: train_stage(base_cmd, out / "base", progress))
    if not (clock.done("export") and (out / BASE_FILE).is_file() and "export" in state):
        state["export"] = clock.run("export", lambda: export_stage(out / "base", out / BASE_FILE))
        write_json_atomic(out / STATE, state)
    if not (clock.done("finetune") and run_stage_done(out / "finetune", settings.finetune_steps)):
        clock.run("finetune", lambda: train_stage(ft_cmd, out / "finetune", progress))
    if not (clock.done("finetune_heads") and run_stage_done(out / "finetune_heads", settings.finetune_steps)):
        clock.run("finetune_heads", lambda: train_stage(heads_cmd, out / "finetune_heads", progress))

    from esmfold_peft.fold.run.resolve import read_run_config

    lm_cfg = read_run_config(out / "base").model.lm
    lm = lm_cfg.path or lm_cfg.name

    def evaluate() -> list[dict]:
        return [measure(out, model, family, settings, lm, progress)
                for model in MODELS for family in ("new", "base")]

    scores = evaluate() if clock.done("evaluate") else clock.run("evaluate", evaluate)
    results = _results(settings, out, state, families, scores, {"base": base_cmd, "finetune": ft_cmd,
                                                                "finetune_heads": heads_cmd}, lm)
    write_json_atomic(out / RESULTS_JSON, results)
    text = markdown(results)
    atomic_write(out / RESULTS_MD, lambda tmp: Path(tmp).write_text(text))
    return results


def _finetune_stage(out: Path, name: str, state: dict) -> dict:
    ft = RunDir(out / name).read_summary()
    return {"steps": ft["steps"], "trainable_parameters": ft["trainable_parameters"],
            "val_lddt_ca_initial": ft.get("val_lddt_ca_initial"), "val_lddt_ca_final": ft.get("val_lddt_ca_final"),
            **state["stages"][name]}


def _results(settings, out, state, families, scores, cmds, lm) -> dict:
    base = RunDir(out / "base").read_summary()
    by = {(s["model"], s["family"]): s for s in scores}
    new_parent = families["new"]["parents"][0]
    return {
        "settings": settings.as_dict(),
        "data": {"synthetic": True,
                 "base_families": [p["name"] for p in families["base"]["parents"]],
                 "new_family": new_parent["name"],
                 "new_family_kind": settings.new_family,
                 "rate": settings.rate, "new_rate": settings.new_rate,
                 "rule": "variants of TS50 chains with the given fraction of residues substituted at random, on "
                         "their parent's backbone (esmfold_peft.data.families); the new family is distant (on the "
                         "first base parent's fold, at new_rate) or unseen (on a parent the base never saw)"},
        "language_model": lm,
        "stages": {
            "base": {"steps": base["steps"], "trainable_parameters": base["trainable_parameters"],
                     "val_lddt_ca_final": base.get("val_lddt_ca_final"), **state["stages"]["base"]},
            "export": {"file": str(out / BASE_FILE), **state.get("export", {}), **state["stages"]["export"]},
            "finetune": _finetune_stage(out, "finetune", state),
            "finetune_heads": _finetune_stage(out, "finetune_heads", state),
            "families": state["stages"]["families"], "evaluate": state["stages"]["evaluate"],
        },
        "scores": scores,
        "new_family": {"before": by[("base", "new")], "after": by[("finetuned", "new")],
                       "after_heads_trained": by[("finetuned_heads", "new")]},
        "old_families": {"before": by[("base", "base")], "after": by[("finetuned", "base")],
                         "after_heads_trained": by[("finetuned_heads", "base")]},
        "routing": {family: by[("routed", family)]["routing"] for family in ("new", "base")},
        "routing_threshold": DEFAULT_THRESHOLD,
        "commands": {"base": train_command(cmds["base"], out / "base"),
                     "export": f"python scripts/export_esmfold.py --run {out / 'base'} --out {out / BASE_FILE}",
                     "finetune": train_command(cmds["finetune"], out / "finetune"),
                     "finetune_heads": train_command(cmds["finetune_heads"], out / "finetune_heads")},
        "total_wall_s": round(sum(s["wall_s"] for s in state["stages"].values()), 1),
        "total_cpu_s": round(sum(s["cpu_s"] for s in state["stages"].values()), 1),
    }


def _f(x, digits=3) -> str:
    return format_score(x, digits, missing="–")


def _margin(s: dict) -> str:
    m = s.get("lddt_ca_margin")
    return "–" if not m else f"{m['margin']:+.3f}"


def _correlation(s: dict) -> str:
    """Pearson's r, or why there is none (too few chains, or pLDDT that hardly varies between them)."""
    if s.get("pearson_r") is not None:
        return f"{s['pearson_r']:.2f}"
    return "none: n too small" if "fewer than" in (s.get("correlation_caveat") or "") else "none: pLDDT flat"


def routing_table(results: dict, family_label: dict) -> list[str]:
    """Where --adapter auto sent each family's held-out variants, and LDDT-Cα under the three ways of serving."""
    by = {(s["model"], s["family"]): s for s in results["scores"]}
    lines = ["", f"Many adapters over one model: the base file serving a library holding the fine-tuned adapter, "
             f"each record routed by k-mer containment against the adapter's training sequences (--adapter auto, "
             f"threshold {results['routing_threshold']:g}); 'adapter for everything' is the fine-tuned run, adapter "
             "merged, on every record.", "",
             "| held-out variants of | chains | routed to the adapter | to the base | routing accuracy | "
             "LDDT-Cα, base alone | adapter for everything | auto-routed |", "|---|---|---|---|---|---|---|---|"]
    for family in ("new", "base"):
        r = by[("routed", family)]["routing"]
        lines.append(f"| {family_label[family]} | {r['n']} | {r['to_adapter']} | {r['to_base']} | {r['accuracy']:.0%} | "
                     f"{_f(by[('base', family)]['lddt_ca'])} | {_f(by[('finetuned', family)]['lddt_ca'])} | "
                     f"{_f(by[('routed', family)]['lddt_ca'])} |")
    return lines


def markdown(results: dict) -> str:
    """results.md: accuracy and calibration before and after (heads frozen, heads trained), then the stages."""
    d, st = results["data"], results["stages"]
    family_label = {"new": f"new family ({d['new_family_kind']}, never seen)", "base": "base families"}
    lines = ["# Fine-tuning demonstration", "",
             f"Synthetic families (variants of TS50 chains with residues substituted at random, on the parent's "
             f"backbone): base families {', '.join(d['base_families'])} ({d['rate']:.0%} substituted); new family "
             f"on {d['new_family']} ({d['new_rate']:.0%} substituted, {d['new_family_kind']}). "
             "Held-out variants only; LDDT-Cα is the global pooled score per chain, mean over chains; 'above "
             "baseline' is LDDT-Cα minus the better sequence-only baseline's (an ideal helix or a compact random "
             "chain of the same length); ECE is the expected calibration error of per-residue pLDDT/100 against "
             "LDDT-Cα (0 is perfect); r is Pearson's over chains (mean pLDDT against LDDT-Cα), none when fewer than 10 "
             "chains or when the chains' mean pLDDT hardly varies (standard deviation under 1 point).", "",
             "| model | held-out variants of | chains | LDDT-Cα | above baseline | mean pLDDT | ECE | r | TM-score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family in ("new", "base"):
        for s in (s for s in results["scores"] if s["family"] == family):
            lines.append(f"| {MODEL_LABELS[s['model']]} | {family_label[family]} | {s['n_chains']} | {_f(s['lddt_ca'])} | "
                         f"{_margin(s)} | {_f(s['mean_plddt'], 1)} | {_f(s['ece'])} | {_correlation(s)} | "
                         f"{_f(s['tm_score'])} |")
    lines += routing_table(results, family_label)
    lines += ["", "| stage | steps | trainable parameters | wall s | CPU s |", "|---|---|---|---|---|"]
    for name in ("families", "base", "export", "finetune", "finetune_heads", "evaluate"):
        s = st[name]
        params = s.get("trainable_parameters", {}).get("total") if isinstance(s.get("trainable_parameters"),
                                                                               dict) else None
        lines.append(f"| {name} | {s.get('steps', '–')} | {'–' if params is None else f'{params:,}'} | "
                     f"{s['wall_s']:.1f} | {s['cpu_s']:.1f} |")
    lines += ["", f"Total: {results['total_wall_s']:.1f} s wall, {results['total_cpu_s']:.1f} s CPU.", "",
              "Commands that make the same runs:", ""]
    lines += [f"    {c}" for c in results["commands"].values()]
    return "\n".join(lines) + "\n"


# --- the command line -------------------------------------------------------------------------

DEFAULTS = DemoSettings()

FLAGS = {  # flag -> DemoSettings field
    "families": "n_families", "rate": "rate", "base_steps": "base_steps", "base_lr": "base_lr",
    "finetune_steps": "finetune_steps", "finetune_lr": "finetune_lr", "rank": "rank", "seed": "seed",
    "threads": "threads", "new_family": "new_family", "new_rate": "new_rate",
}


def unit_fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n\n" + exit_code_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory (default: runs/demo-finetune, runs/demo-finetune-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiniest shapes and 2 steps per run: checks that every stage works, in seconds "
                             "(its numbers mean nothing)")
    parser.add_argument("--families", type=positive_int, metavar="N",
                        help=f"base families (default: {DEFAULTS.n_families})")
    parser.add_argument("--rate", type=unit_fraction, metavar="X",
                        help=f"fraction of residues substituted in each variant of a base family "
                             f"(default: {DEFAULTS.rate})")
    parser.add_argument("--new-family", choices=NEW_FAMILY_KINDS,
                        help="distant: the new family is on the first base family's fold, with more residues "
                             "substituted; unseen: on a fold the base never saw; clade: on the first base family's "
                             "fold, variants (at --rate) of one ancestor with --new-rate substituted, so they share "
                             f"its residues as a real family does (default: {DEFAULTS.new_family})")
    parser.add_argument("--new-rate", type=unit_fraction, metavar="X",
                        help=f"fraction of residues substituted in each variant of the new family "
                             f"(default: {DEFAULTS.new_rate})")
    parser.add_argument("--base-steps", type=positive_int, metavar="N",
                        help=f"base training steps (default: {DEFAULTS.base_steps})")
    parser.add_argument("--base-lr", type=positive_float, metavar="LR",
                        help=f"base learning rate (default: {DEFAULTS.base_lr:g})")
    parser.add_argument("--finetune-steps", type=positive_int, metavar="N",
                        help=f"fine-tuning steps (default: {DEFAULTS.finetune_steps})")
    parser.add_argument("--finetune-lr", type=positive_float, metavar="LR",
                        help=f"fine-tuning learning rate of the LoRTA factors (default: {DEFAULTS.finetune_lr:g})")
    parser.add_argument("--rank", type=positive_int, metavar="R", help=f"LoRTA rank (default: {DEFAULTS.rank})")
    parser.add_argument("--seed", type=non_negative_int, metavar="S",
                        help=f"seed of the families and runs (default: {DEFAULTS.seed})")
    parser.add_argument("--threads", type=non_negative_int, metavar="N",
                        help=f"torch CPU threads, 0 for torch's default (default: {DEFAULTS.threads})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from esmfold_peft.runtime.rundir import project_root

    changes = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag) is not None}
    settings = DemoSettings.smoke(**changes) if args.smoke else DemoSettings(**changes)
    out = args.out or project_root() / "runs" / ("demo-finetune-smoke" if args.smoke else "demo-finetune")
    results = run_demo(settings, out, progress=not args.no_progress)
    print((out / RESULTS_MD).read_text(), end="")
    new = results["new_family"]
    frozen, trained = new["after"], new["after_heads_trained"]
    print(f"\nnew family: LDDT-Cα {new['before']['lddt_ca']:.3f} before, {frozen['lddt_ca']:.3f} after fine-tuning "
          f"({_margin(frozen)} above the better sequence-only baseline); pLDDT calibration error (ECE, "
          f"{frozen['n_residues']} residues) {_f(frozen['ece'])} with the heads frozen, {_f(trained['ece'])} with "
          f"them trained (LDDT-Cα {trained['lddt_ca']:.3f}); results in {out / RESULTS_MD} and {out / RESULTS_JSON}")
    print(f"next: python scripts/predict.py --fasta SEQS.fasta --run {out / 'finetune'} --out PRED_DIR   "
          "(the fine-tuned model, adapter merged); the recipe for Meta's ESMFold is in docs/finetune.md")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
