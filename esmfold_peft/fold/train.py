"""The training loop: AF2 optimizer and schedule, clipping, EMA, accumulation, recycling, DDP,
validation LDDT-Cα, atomic checkpoints with exact resume, and a clean stop on divergence.

Everything random is a pure function of (seed, step) or restored from the checkpoint, so a run
of 2N steps and a run of N steps resumed for N more end with the same parameters (on CPU).
Run it through `scripts/train_fold.py`, or with several processes through `torchrun`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Optional

import ml_collections as mlc
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data import ChainDataset, ChainFilter, build_cache, collate, demo_source, directory_source, openfold_source
from ..data.dataset import WeightedBatchSampler
from ..data.demo import ensure_demo_data
from ..runtime.errors import (COMPLETED, DIVERGED, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, FAILED, INTERRUPTED,
                              ConfigError, UserError)
from ..runtime.rundir import RunDir, RunSummary
from ..runtime.session import (Dist, StopSignal, autocast_for, remove_file_logging, setup_distributed,
                               setup_file_logging, step_seed, teardown_distributed)
from ..runtime.text import finite_or_none, format_score
from .build import build_model, parameter_counts
from .checkpoint import (export_model, load_pretrained_base, load_trained_state, needs_pretrained_base,
                         pretrained_record, read_checkpoint, save_checkpoint, set_rng_state)
from .config import adapter_alpha, check_new_run
from .losses import fold_loss
from .plots import plot_training_curves
from .runs import check_resumable_config, fill_defaults, finish, stored_form
from .validate import validate

log = logging.getLogger("esmfold_peft.train")

STATUS_OF_EXIT = {EXIT_OK: COMPLETED, EXIT_DIVERGED: DIVERGED, EXIT_INTERRUPTED: INTERRUPTED}
resolve_paths = fill_defaults  # the name other modules know


# --- small pieces -------------------------------------------------------------------------------

def af2_lr_lambda(cfg: mlc.ConfigDict):
    """Linear warm-up, then constant, then ×decay_factor every decay_every steps from decay_start."""
    o = cfg.optim

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        if step >= o.decay_start:
            f *= o.decay_factor ** (1 + (step - o.decay_start) // o.decay_every)
        return f

    return factor


class EMA:
    """Exponential moving average of the trainable parameters (AF2: decay 0.999)."""

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model):
        """Temporarily put the averaged weights into the model (e.g. for validation)."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    params[n].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


# --- data ---------------------------------------------------------------------------------------

def has_validation_set(cfg: mlc.ConfigDict) -> bool:
    """Whether the config names validation chains (without reading any data): the rule of `source_for`."""
    d = cfg.data
    return d.source == "demo" or (d.source == "dir" and bool(d.val_dir)) or \
        (d.source == "openfold" and bool(d.val_mmcif_dir))


def source_for(cfg: mlc.ConfigDict, split: str):
    """The chains of `split` ('train' or 'val') for cfg.data.source; None when the split is not set."""
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if d.source == "demo":
        return demo_source(split, d.root)
    if d.source == "openfold":
        if split == "train":
            flt = ChainFilter(max_resolution=d.max_resolution,
                              max_single_residue_fraction=d.max_single_residue_fraction,
                              max_length=d.max_length or None, min_release_date=d.min_release_date or None,
                              max_release_date=d.max_release_date or None)
            return openfold_source(d.mmcif_dir, d.chain_data_cache, flt)
        if not d.val_mmcif_dir:
            return None
        return openfold_source(d.val_mmcif_dir, d.val_chain_data_cache or d.chain_data_cache,
                               ChainFilter(max_length=d.val_max_length or None))
    if d.source == "dir":
        if split == "train" and not d.train_dir:
            raise ConfigError("data.source=dir needs data.train_dir (and optionally data.val_dir)")
        directory = d.train_dir if split == "train" else d.val_dir
        return directory_source(directory) if directory else None
    raise ConfigError(f"data.source must be demo, openfold or dir; got {d.source!r}")


def build_split(cfg: mlc.ConfigDict, split: str, is_main: bool = True,
                crop_size: Optional[int] = None, progress: bool = True) -> Optional[ChainDataset]:
    """The cached chains of one split (parsed once, reused while the source is unchanged).

    Training chains are cropped to train.crop_size and validation chains to val.crop_size (0 =
    whole chains), unless `crop_size` is given. None when the split has no source or no chain.
    """
    source = source_for(cfg, split)
    if source is None:
        return None
    cache = build_cache(source, Path(cfg.data.cache_dir) / split, progress=is_main and progress)
    for path, reason in cache.bad if is_main else ():
        log.warning("skipped %s: %s", path, reason)
    if not len(cache):
        return None
    if crop_size is None:
        crop_size = cfg.train.crop_size if split == "train" else (cfg.val.crop_size or None)
    return ChainDataset(cache, crop_size=crop_size, unknown_resolution=cfg.data.unknown_resolution)


def build_datasets(cfg: mlc.ConfigDict, is_main: bool, progress: bool = True):
    train = build_split(cfg, "train", is_main, progress=progress)
    if train is None:
        raise UserError(f"no usable training chains from data.source={cfg.data.source} (see the skipped files above)")
    return train, build_split(cfg, "val", is_main, progress=progress)


def batches(train: ChainDataset, sampler: WeightedBatchSampler, start_micro: int, num_workers: int):
    """Training batches from micro-step `start_micro` on; the order depends only on (seed, step)."""
    if num_workers == 0:
        micro = start_micro
        while True:
            yield collate([train[k] for k in sampler.batch_keys(micro)])
            micro += 1
    sampler.start_step = start_micro
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                         persistent_workers=True)
    yield from loader


# --- the loop -----------------------------------------------------------------------------------

def train(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True) -> int:
    """Train; return the process exit status (0 ok, 3 diverged, 130 interrupted)."""
    return train_model(cfg, out_dir, resume=resume, progress=progress)[0]


def train_model(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True):
    """Train; return (exit status, the trained model as this process holds it).

    `cfg` is the run's resolved config (`runs.new_run_config` / `runs.resume_run_config`). A new run
    needs a directory that holds no run (a failed start may be replaced); a resumed one continues
    from its checkpoint, or from step 0 when it stopped before its first checkpoint. A fault in the
    inputs (UserError) marks the run failed with its reason and propagates; an interrupt anywhere
    marks it interrupted (with a checkpoint when steps were done) and returns 130.
    """
    run = RunDir(out_dir)
    finish(cfg)  # α and default paths made explicit, values checked (idempotent)
    d, device = setup_distributed(cfg.train.device)
    state = _RunState(run=run, cfg=cfg, d=d)
    try:
        if d.main:
            replace_failed = run.check_new() if not resume else run.check_resumable()
            if resume:
                check_resumable_config(run.path, cfg)
            else:
                check_new_run(cfg)
            run.clean_temporaries()
            run.start(stored_form(cfg, run.path), replace_failed=bool(replace_failed))
            state.log_handler = setup_file_logging(run.log_file)
        with StopSignal() as stop:
            status = _train(state, device, resume, progress, stop)
        return status, state.model
    except KeyboardInterrupt:
        state.interrupted()
        return EXIT_INTERRUPTED, state.model
    except UserError as exc:
        state.failed(str(exc))
        raise
    finally:
        if state.log_handler is not None:
            remove_file_logging(state.log_handler)
        teardown_distributed()


class _RunState:
    """What the loop has built so far, so an interrupt or a failure anywhere can be recorded truthfully."""

    def __init__(self, run: RunDir, cfg: mlc.ConfigDict, d: Dist):
        self.run, self.cfg, self.d = run, cfg, d
        self.model = self.log_handler = self.save = None  # save(): a checkpoint of the current step
        self.step, self.saved_step, self.counts = 0, 0, None
        self.in_step = False  # between a step's first gradient and its last update the state is not consistent
        self.extra = {"val_initial": None, "wall_before": 0.0}
        self.started = time.time()

    def summary(self, status: str, reason=None, divergence=None, final_val=None) -> dict:
        cfg, adapted = self.cfg, self.cfg.adapter.method in ("lorta", "lora")
        wall = self.extra["wall_before"] + time.time() - self.started
        results = {
            "adapter": cfg.adapter.method, "rank": cfg.adapter.rank if adapted else None,
            "alpha": adapter_alpha(cfg) if adapted else None, "config": cfg.name,
            "language_model": getattr(self.model, "lm_description", ""), "trainable_parameters": self.counts,
            "device": str(getattr(self, "device", "")), "processes": self.d.world,
            "diverged": status == DIVERGED, "divergence": divergence,
            "divergence_rule": f"non-finite loss or gradient norm, or loss > {cfg.train.diverge_loss_threshold}",
            "val_lddt_ca_initial": finite_or_none((self.extra["val_initial"] or {}).get("lddt_ca")),
            "val_lddt_ca_final": finite_or_none((final_val or {}).get("lddt_ca")),
            "val_final": final_val, "ema": bool(cfg.optim.ema_decay),
        }
        return self.run.write_summary(RunSummary("fold", status, steps=self.step, target_steps=cfg.train.steps,
                                                 wall_time_s=round(wall, 2), reason=reason, results=results))

    def interrupted(self) -> None:
        if not self.d.main or not self.run.config.exists():
            return
        if self.save is not None and self.step > self.saved_step and not self.in_step:
            self.save()
        reason = f"interrupted at step {self.step}; continue with --resume"
        log.warning("%s", reason)
        self.summary(INTERRUPTED, reason=reason)

    def failed(self, reason: str) -> None:
        if self.d.main and self.run.config.exists() and not self.run.last_checkpoint.exists():
            self.summary(FAILED, reason=reason)


def _train(state: _RunState, device, resume: bool, progress: bool, stop: StopSignal) -> int:
    cfg, d, run = state.cfg, state.d, state.run
    state.device = device
    ckpt = read_checkpoint(run.last_checkpoint) if resume and run.last_checkpoint.exists() else None
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if d.main and cfg.data.source == "demo":
        ensure_demo_data(cfg.data.root, log=lambda m: log.info("demo data: %s", m))
    if d.world > 1:
        dist.barrier()

    accum = accumulation_steps(cfg, d.world)
    seed_everything(cfg.train.seed + d.rank)
    if d.main:  # one process parses and caches; the others then open the same cache
        train_ds, val_ds = build_datasets(cfg, True, progress)
    if d.world > 1:
        dist.barrier()
    if not d.main:
        train_ds, val_ds = build_datasets(cfg, False)
    model = build_model(cfg)
    base_loaded = False
    if cfg.model.init_from and ckpt is None:  # a new run starts from a pretrained ESMFold and records which
        from .pretrained import init_from_checkpoint

        init_from_checkpoint(model, cfg)
        if d.main:
            state.extra["init_from"] = pretrained_record(cfg)
    elif cfg.model.init_from and needs_pretrained_base(model, ckpt["model"]):  # its checkpoints hold only what trains
        load_pretrained_base(model, cfg, ckpt["extra"].get("init_from"), str(run.last_checkpoint))
        base_loaded = True
    model = state.model = model.to(device)
    counts = state.counts = parameter_counts(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    o = cfg.optim
    optimizer = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, af2_lr_lambda(cfg))
    ema = EMA(named, o.ema_decay) if o.ema_decay else None
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                           else None) if d.world > 1 else model)

    if ckpt is not None:
        load_trained_state(model, ckpt["model"], str(run.last_checkpoint), base_loaded=base_loaded)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        state.step = state.saved_step = ckpt["step"]
        state.extra = ckpt["extra"]
        if d.main:
            log.info("resumed from %s at step %d", run.last_checkpoint, state.step)
    if d.main:
        run.truncate_metrics(state.step)  # records after the checkpoint are written again

    def save() -> None:
        state.extra["wall_before"] += time.time() - state.started
        state.started = time.time()
        if d.main:
            save_checkpoint(run.last_checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                            step=state.step, cfg=cfg, extra=state.extra)
        state.saved_step = state.step

    state.save = save if d.world == 1 else None  # with several processes only a step's end is a safe point
    if d.main:
        log.info("device %s, %d process(es), %d micro-batch(es) of %d per step; trainable parameters: %s",
                 device, d.world, accum, cfg.train.batch_size, counts)
    bf16 = bool(cfg.train.bf16) and device.type == "cuda"

    def run_validation(tag: str):
        if val_ds is None or not d.main:
            return None
        ctx = ema.applied(model) if ema is not None else contextlib.nullcontext()
        with ctx:
            res = validate(model, val_ds, device, num_recycles=cfg.val.num_recycles, bf16=bf16,
                           max_chains=cfg.data.val_max_chains, progress=progress)
        res.pop("chains")
        log.info("validation (%s, step %d): LDDT-Ca %.4f (%s), pooled over pairs %.4f, mean pLDDT %.1f",
                 tag, state.step, res["lddt_ca"], "EMA weights" if ema is not None else "weights",
                 res["lddt_ca_pooled_all"], res["mean_plddt"])
        run.append_metrics({"step": state.step, "val": res})
        return res

    if ckpt is not None and state.step >= cfg.train.steps and run.status() == COMPLETED:
        log.info("%s is already complete at step %d (give --steps N to train further)", run.path, state.step)
        return EXIT_OK
    if state.step == 0 and state.extra["val_initial"] is None:
        state.extra["val_initial"] = run_validation("initial")

    sampler = WeightedBatchSampler(train_ds.cache.weights, cfg.train.batch_size, cfg.train.seed,
                                   rank=d.rank, world_size=d.world)
    data = batches(train_ds, sampler, state.step * accum, cfg.data.num_workers)
    total = cfg.train.steps
    status, divergence = EXIT_OK, None
    bar = tqdm(total=total, initial=min(state.step, total), desc=f"train {cfg.adapter.method}",
               disable=not (progress and d.main), dynamic_ncols=True)
    while state.step < total:
        with stop.deferred():  # a signal here finishes the step, checkpoints and stops
            state.in_step = True
            t0 = time.time()
            step = state.step
            recycles = int(torch.randint(0, cfg.train.max_recycles + 1, (1,),
                                         generator=torch.Generator().manual_seed(step_seed(cfg.train.seed + 1, step))))
            sums: dict = {}
            bad = None
            optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                batch = next(data)
                batch["use_clamped_fape"] = clamp_draw(cfg, step * accum + micro, d)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = contextlib.nullcontext() if (d.world == 1 or micro == accum - 1) else ddp_model.no_sync()
                with sync:
                    with autocast_for(device, bf16):
                        out = ddp_model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=recycles)
                        loss, terms = fold_loss(out, batch, cfg.loss)
                    bad = bad or divergence_reason(terms["loss"], cfg)
                    if bad is None:
                        (loss / accum).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            grad_norm = None
            if bad is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.clip_grad_norm))
                if not math.isfinite(grad_norm):
                    bad = f"non-finite gradient norm ({grad_norm})"
            bad = agree(bad, d, device)
            if bad is not None:
                divergence = {"step": step, "rule": bad, "terms": sums}
                log.error("diverged at step %d: %s; last good checkpoint left untouched", step, bad)
                status = EXIT_DIVERGED
                break
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(named)
            state.step = step = step + 1
            dt = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", s_per_step=f"{dt:.2f}", refresh=False)
            if d.main and (step % cfg.train.log_every == 0 or step == total):
                run.append_metrics({"step": step, **{k: round(v, 6) for k, v in sums.items()},
                                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                    "recycles": recycles, "sec_per_step": round(dt, 4)})
            state.in_step = False
        if cfg.train.val_every and step % cfg.train.val_every == 0 and step < total:
            run_validation("periodic")
        with stop.deferred():
            if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == total or stop.requested:
                save()
        if stop.requested and step < total:
            raise KeyboardInterrupt
    bar.close()

    final_val = None
    if status == EXIT_OK:
        final_val = run_validation("final")
        if d.main:
            ctx = ema.applied(model) if ema is not None else contextlib.nullcontext()
            with ctx:
                export_model(run.path, model, stored_form(cfg, run.path),
                             pretrained=state.extra.get("init_from") if cfg.model.init_from else None)
    if d.main:
        summary = state.summary(STATUS_OF_EXIT[status], divergence=divergence, final_val=final_val,
                                reason=divergence["rule"] if divergence else None)
        plot_training_curves(run.path)
        log.info("wrote %s (status: %s, LDDT-Ca %s -> %s)", run.path, summary["status"],
                 format_score(summary["val_lddt_ca_initial"]), format_score(summary["val_lddt_ca_final"]))
    if d.world > 1:
        dist.barrier()
    return status


# --- helpers ------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """torch, numpy (openfold initialises with scipy's truncnorm, which draws from numpy) and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def accumulation_steps(cfg: mlc.ConfigDict, world: int) -> int:
    per_step = cfg.train.batch_size * world
    eff = cfg.train.effective_batch_size or per_step
    if eff % per_step:
        raise ConfigError(f"train.effective_batch_size {eff} is not a multiple of batch_size×processes = {per_step}")
    return eff // per_step


def clamp_draw(cfg: mlc.ConfigDict, micro: int, d: Dist) -> torch.Tensor:
    """Per example: 1 = clamped FAPE (probability fape.clamp_prob), as AF2; same draw on every rank."""
    g = torch.Generator().manual_seed(step_seed(cfg.train.seed + 2, micro))
    draws = torch.rand(cfg.train.batch_size * d.world, generator=g) < cfg.loss.fape.clamp_prob
    lo = d.rank * cfg.train.batch_size
    return draws[lo:lo + cfg.train.batch_size].float()


def divergence_reason(loss: float, cfg: mlc.ConfigDict) -> Optional[str]:
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if loss > cfg.train.diverge_loss_threshold:
        return f"loss {loss:.4g} above train.diverge_loss_threshold={cfg.train.diverge_loss_threshold}"
    return None


def agree(reason: Optional[str], d: Dist, device) -> Optional[str]:
    """Every rank stops if one diverged."""
    if d.world == 1:
        return reason
    flag = torch.tensor([0.0 if reason is None else 1.0], device=device)
    dist.all_reduce(flag)
    return reason or ("another process diverged" if flag.item() > 0 else None)
