"""The NLP training loop on the shared run contract: one loop for every task.

    setup (config, run directory, task, optimizer, checkpoint) -> evaluate -> steps -> evaluate -> export

Exact resume: the examples of step s are a pure function of (seed, s) (a seeded permutation per
epoch), dropout is seeded per step from (seed, s), and the learning rate is a function of s; the
checkpoint holds the trained parameters, the optimizer state and the step. A run of 2N steps and a
run of N steps resumed for N more end with the same parameters (on CPU).

Exit statuses are the run contract's: 0 completed, 3 diverged (the last good checkpoint is kept),
130 interrupted (the step in flight is finished and checkpointed first).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import ml_collections as mlc
import torch
from tqdm import tqdm

from ..runtime.artifacts import torch_load, torch_save
from ..runtime.errors import (COMPLETED, DIVERGED, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, FAILED, INTERRUPTED,
                              RUNNING, UserError)
from ..runtime.rundir import RunDir, RunSummary
from ..runtime.session import StopSignal, remove_file_logging, resolve_device, setup_file_logging, step_seed
from ..runtime.text import finite_or_none
from .models import describe_layout, load_trainable_state, prepare_training, trainable_state
from .plots import plot_curves
from .tasks import Task, task_for

log = logging.getLogger("esmfold_peft.nlp")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step `step`: consecutive slices of a fresh permutation per epoch."""
    out, cache = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            g = torch.Generator().manual_seed(step_seed(seed, epoch, "epoch"))
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos % n])
    return out


def lr_factor(cfg: mlc.ConfigDict, step: int) -> float:
    o, total = cfg.optim, cfg.train.steps
    warmup = int(round(o.warmup_ratio * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(task: Task, cfg: mlc.ConfigDict) -> torch.optim.Optimizer:
    heads = set(task.net.head_names)
    body, head = [], []
    for name, p in task.net.model.named_parameters():
        if p.requires_grad:
            (head if name in heads else body).append(p)
    groups = [g for g in ({"params": body, "lr": cfg.optim.lr, "base_lr": cfg.optim.lr},
                          {"params": head, "lr": cfg.optim.head_lr, "base_lr": cfg.optim.head_lr}) if g["params"]]
    return torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


class Divergence(Exception):
    pass


def train(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True,
          stop: Optional[StopSignal] = None) -> int:
    """Train cfg's task into the run directory `out_dir`; return the exit status (0, 3 or 130).

    With `resume`, `cfg` must be the run's stored config (with permitted changes, see
    `config.config_for_resume`). `stop` replaces the signal handler (tests).
    """
    run = RunDir(out_dir)
    if resume:
        run.check_resumable()
        if not run.last_checkpoint.exists():
            raise UserError(f"{run.path} has no checkpoint to resume from; start it again without --resume")
        replace = False
    else:
        replace = run.check_new()
        run.start(cfg.to_dict(), replace_failed=replace)
    run.clean_temporaries()
    if resume:
        run.write_config(cfg.to_dict())
    handler = setup_file_logging(run.log_file)
    try:
        return _train(cfg, run, resume, progress, stop or StopSignal())
    finally:
        remove_file_logging(handler)


def _train(cfg, run: RunDir, resume: bool, progress: bool, stop: StopSignal) -> int:
    started = time.time()
    extra = {"eval_initial": None, "wall_before": 0.0}
    step = 0
    task = None
    try:
        device = resolve_device(cfg.train.device)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed)  # the head's initialisation and the adapter's
        task = task_for(cfg, device)
        net = task.setup()
        counts = prepare_training(net, cfg)
        net.model.to(device)
        optimizer = build_optimizer(task, cfg)
        if resume:
            ckpt = torch_load(run.last_checkpoint)
            load_trainable_state(net.model, ckpt["trainable"], str(run.last_checkpoint))
            optimizer.load_state_dict(ckpt["optimizer"])
            step, extra = int(ckpt["step"]), dict(ckpt["extra"])
            if step > cfg.train.steps:
                raise UserError(f"the run is at step {step}; --steps {cfg.train.steps} would go back (give more)")
            run.truncate_metrics(step)
            log.info("resumed %s at step %d of %d", run.path, step, cfg.train.steps)
        log.info("task %s on %s: %s", cfg.task, net.description, task.data_summary())
        log.info("trainable parameters: %s", counts)
        task.before_training(run, extra)
    except (UserError, KeyboardInterrupt) as exc:
        if not resume:  # a new run that never started leaves the folder free for another try
            reason = "interrupted during set-up" if isinstance(exc, KeyboardInterrupt) else str(exc)
            run.write_summary(RunSummary(application="nlp", status=FAILED, target_steps=cfg.train.steps,
                                         reason=reason))
        raise  # a resumed run keeps its summary and stays resumable
    results = {"task": cfg.task, "adapter": cfg.adapter.method,
               "rank": cfg.adapter.rank if cfg.adapter.method in ("lorta", "lora") else None,
               "alpha": cfg.adapter.alpha if cfg.adapter.method in ("lorta", "lora") else None,
               "model": net.description, "config": cfg.name, "parameters": counts,
               "adapter_parameters": counts["adapter"], "layout": describe_layout(net), "device": str(device),
               "data": task.data_summary(), "primary_metric": task.primary,
               "higher_is_better": task.higher_is_better}

    def finish(status: str, reason: Optional[str] = None, final: Optional[dict] = None, more: Optional[dict] = None):
        initial = extra.get("eval_initial") or {}
        res = dict(results, eval_initial=initial, eval_final=final,
                   primary_initial=finite_or_none(initial.get(task.primary)),
                   primary_final=finite_or_none((final or {}).get(task.primary)), **(more or {}))
        wall = extra["wall_before"] + time.time() - started
        run.write_summary(RunSummary(application="nlp", status=status, steps=step, target_steps=cfg.train.steps,
                                     wall_time_s=round(wall, 2), reason=reason, results=res))
        plot_curves(run.path, task.primary)
        return res

    finish(RUNNING)
    model = net.model
    params = [p for p in model.parameters() if p.requires_grad]
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"{cfg.task} {cfg.adapter.method}", disable=not progress,
               dynamic_ncols=True)
    try:
        if extra.get("eval_initial") is None:
            extra["eval_initial"] = evaluate(task, run, 0)
        with stop:
            status = None
            while step < cfg.train.steps:
                t0 = time.time()
                with stop.deferred():
                    terms, grad_norm = train_step(task, cfg, optimizer, params, step, micro)
                    step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    run.append_metrics({"step": step, **terms, "lr": optimizer.param_groups[0]["lr"],
                                        "grad_norm": grad_norm, "sec_per_step": round(time.time() - t0, 4)})
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    evaluate(task, run, step)
                if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == cfg.train.steps \
                        or stop.requested:
                    extra["wall_before"] += time.time() - started
                    started = time.time()
                    save_checkpoint(run, model, optimizer, step, extra, cfg)
                if stop.requested and step < cfg.train.steps:
                    status = INTERRUPTED
                    break
    except Divergence as exc:
        bar.close()
        log.error("diverged at step %d: %s; the last good checkpoint is kept", step, exc)
        finish(DIVERGED, f"step {step + 1}: {exc}")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        bar.close()
        if not run.last_checkpoint.exists():  # nothing to resume: the folder may take a new run
            finish(FAILED, "interrupted before the first checkpoint; start the run again")
            return EXIT_INTERRUPTED
        log.warning("interrupted at step %d; continue with --resume (from the last checkpoint)", step)
        finish(INTERRUPTED, "interrupted (the last checkpoint is kept)")
        return EXIT_INTERRUPTED
    bar.close()
    if status == INTERRUPTED:
        log.warning("stopped at step %d; continue with --resume", step)
        finish(INTERRUPTED, f"stopped at step {step} by a signal; checkpoint written")
        return EXIT_INTERRUPTED
    final = evaluate(task, run, step)
    more = task.after_training(run, extra)
    written = task.export(run)
    res = finish(COMPLETED, None, final, {"exported": [str(p) for p in written], **more})
    log.info("%s: %s %s -> %s", run.path, task.primary, res["primary_initial"], res["primary_final"])
    return EXIT_OK


def train_step(task: Task, cfg, optimizer, params, step: int, micro: int) -> tuple[dict, Optional[float]]:
    """One optimizer step; raises Divergence on a non-finite or too large loss or gradient."""
    factor = lr_factor(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    task.net.model.train()
    torch.manual_seed(step_seed(cfg.train.seed, step, "dropout"))
    indices = batch_indices(task.train_size, cfg.train.batch_size, cfg.train.seed, step)
    optimizer.zero_grad(set_to_none=True)
    sums: dict = {}
    parts = [indices[i:i + micro] for i in range(0, len(indices), micro)]
    for part in parts:
        loss, terms = task.loss(part)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Divergence(f"non-finite loss ({value})")
        if value > cfg.train.diverge_loss_threshold:
            raise Divergence(f"loss {value:.4g} above train.diverge_loss_threshold={cfg.train.diverge_loss_threshold}")
        (loss * len(part) / len(indices)).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(part) / len(indices)
    grad_norm = None
    if cfg.optim.clip_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm))
        if not math.isfinite(grad_norm):
            raise Divergence(f"non-finite gradient norm ({grad_norm})")
    optimizer.step()
    return {k: round(v, 6) for k, v in sums.items()}, grad_norm


def evaluate(task: Task, run: RunDir, step: int) -> dict:
    t0 = time.time()
    results = task.evaluate()
    log.info("evaluation at step %d (%.1f s): %s", step, time.time() - t0,
             ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
    run.append_metrics({"step": step, "eval": results})
    return results


def save_checkpoint(run: RunDir, model, optimizer, step: int, extra: dict, cfg) -> None:
    torch_save({"step": step, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "extra": extra, "config": cfg.to_dict()}, run.last_checkpoint)
