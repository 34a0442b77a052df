"""The training loop: AF2 optimizer and schedule, clipping, EMA, accumulation, recycling, DDP,
validation LDDT-Cα, atomic checkpoints with exact resume, and a clean stop on divergence.

Everything random is a pure function of (seed, step) or restored from the checkpoint, so a run
of 2N steps and a run of N steps resumed for N more end with the same parameters (on CPU).
Run it through `scripts/train_fold.py`, or with several processes through `torchrun`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ml_collections as mlc
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data import ChainDataset, ChainFilter, build_cache, collate, demo_source, directory_source, openfold_source
from ..data.dataset import WeightedBatchSampler, step_seed
from ..data.demo import DemoDataError, ensure_demo_data
from .build import build_model, parameter_counts
from .checkpoint import (LAST, CheckpointError, export_model, load_trained_state, read_checkpoint, save_checkpoint,
                         set_rng_state, write_json_atomic)
from .config import adapter_alpha, project_root
from .lm import LanguageModelError
from .losses import fold_loss
from .plots import plot_training_curves
from .validate import autocast_for, maybe, validate

log = logging.getLogger("esmfold_peft.train")

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 3, 130
# what a run can fail with before it trains, from its inputs (scripts print these as one-line errors)
RUN_SETUP_ERRORS = (FileExistsError, FileNotFoundError, ValueError, LanguageModelError, CheckpointError,
                    DemoDataError)


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


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device_pref == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # validation runs on rank 0 while the others wait in their next collective: allow for it
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return d, device


class StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step and checkpoint."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (signal again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- data ---------------------------------------------------------------------------------------

def resolve_paths(cfg: mlc.ConfigDict) -> None:
    """Fill defaults that depend on where things are (demo data root, cache folder, LM path)."""
    if cfg.data.source == "demo" and not cfg.data.root:
        cfg.data.root = str(project_root() / "data" / "demo")
    if "{demo}" in cfg.model.lm.path:
        cfg.model.lm.path = cfg.model.lm.path.replace("{demo}", cfg.data.root or str(project_root() / "data" / "demo"))
    if not cfg.data.cache_dir:
        cfg.data.cache_dir = str(project_root() / "data" / "cache" / cfg.data.source)


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
            raise ValueError("data.source=dir needs data.train_dir (and optionally data.val_dir)")
        directory = d.train_dir if split == "train" else d.val_dir
        return directory_source(directory) if directory else None
    raise ValueError(f"data.source must be demo, openfold or dir; got {d.source!r}")


def build_split(cfg: mlc.ConfigDict, split: str, is_main: bool = True,
                crop_size: Optional[int] = None) -> Optional[ChainDataset]:
    """The cached chains of one split (parsed once, reused while the source is unchanged).

    Training chains are cropped to train.crop_size and validation chains to val.crop_size (0 =
    whole chains), unless `crop_size` is given. None when the split has no source or no chain.
    """
    source = source_for(cfg, split)
    if source is None:
        return None
    cache = build_cache(source, Path(cfg.data.cache_dir) / split, progress=is_main)
    for path, reason in cache.bad if is_main else ():
        log.warning("skipped %s: %s", path, reason)
    if not len(cache):
        return None
    if crop_size is None:
        crop_size = cfg.train.crop_size if split == "train" else (cfg.val.crop_size or None)
    return ChainDataset(cache, crop_size=crop_size, unknown_resolution=cfg.data.unknown_resolution)


def build_datasets(cfg: mlc.ConfigDict, is_main: bool):
    train = build_split(cfg, "train", is_main)
    if train is None:
        raise ValueError(f"no usable training chains from data.source={cfg.data.source}")
    return train, build_split(cfg, "val", is_main)


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
    """Train; return (exit status, the trained model as this process holds it)."""
    handlers: list = []  # the run's log file handler, removed when the run ends
    try:
        return _train_model(cfg, out_dir, resume, progress, handlers)
    finally:
        for handler in handlers:
            logging.getLogger("esmfold_peft").removeHandler(handler)
            handler.close()


def _train_model(cfg: mlc.ConfigDict, out_dir: Path, resume: bool, progress: bool, handlers: list):
    out_dir = Path(out_dir)
    d, device = setup_distributed(cfg.train.device)
    resolve_paths(cfg)
    ckpt_path = out_dir / "checkpoints" / LAST
    ckpt = None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        check_resumable(cfg, mlc.ConfigDict(ckpt["config"]))
    elif ckpt_path.exists():
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(setup_file_logging(out_dir))
        write_json_atomic(out_dir / "config.json", cfg.to_dict())
        if cfg.data.source == "demo":
            ensure_demo_data(cfg.data.root, log=lambda m: log.info("demo data: %s", m))
    if d.world > 1:
        dist.barrier()

    accum = accumulation_steps(cfg, d.world)
    seed_everything(cfg.train.seed + d.rank)
    if d.main:  # one process parses and caches; the others then open the same cache
        train_ds, val_ds = build_datasets(cfg, True)
    if d.world > 1:
        dist.barrier()
    if not d.main:
        train_ds, val_ds = build_datasets(cfg, False)
    model = build_model(cfg).to(device)
    counts = parameter_counts(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    o = cfg.optim
    optimizer = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, af2_lr_lambda(cfg))
    ema = EMA(named, o.ema_decay) if o.ema_decay else None
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                           else None) if d.world > 1 else model)

    step, extra = 0, {"val_initial": None, "wall_before": 0.0}
    if ckpt is not None:
        load_trained_state(model, ckpt["model"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        step, extra = ckpt["step"], ckpt["extra"]
        if d.main:
            truncate_metrics(out_dir / "metrics.jsonl", step)
            log.info("resumed from %s at step %d", ckpt_path, step)

    if d.main:
        log.info("device %s, %d process(es), %d micro-batch(es) of %d per step; trainable parameters: %s",
                 device, d.world, accum, cfg.train.batch_size, counts)
    bf16 = bool(cfg.train.bf16) and device.type == "cuda"

    def run_validation(tag: str) -> Optional[dict]:
        if val_ds is None or not d.main:
            return None
        ctx = ema.applied(model) if ema is not None else contextlib.nullcontext()
        with ctx:
            res = validate(model, val_ds, device, num_recycles=cfg.val.num_recycles, bf16=bf16,
                           max_chains=cfg.data.val_max_chains, progress=progress)
        res.pop("chains")
        log.info("validation (%s, step %d): LDDT-Ca %.4f (%s), pooled over pairs %.4f, mean pLDDT %.1f",
                 tag, step, res["lddt_ca"], "EMA weights" if ema is not None else "weights",
                 res["lddt_ca_pooled_all"], res["mean_plddt"])
        append_metrics(out_dir, {"step": step, "val": res})
        return res

    if step == 0 and extra["val_initial"] is None:
        extra["val_initial"] = run_validation("initial")

    sampler = WeightedBatchSampler(train_ds.cache.weights, cfg.train.batch_size, cfg.train.seed,
                                   rank=d.rank, world_size=d.world)
    data = batches(train_ds, sampler, step * accum, cfg.data.num_workers)
    total = cfg.train.steps
    started = time.time()
    status, divergence, last_val = EXIT_OK, None, None
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.adapter.method}", disable=not (progress and d.main),
               dynamic_ncols=True)
    with StopSignal() as stop:
        while step < total:
            t0 = time.time()
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
            step += 1
            dt = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", s_per_step=f"{dt:.2f}", refresh=False)
            if d.main and (step % cfg.train.log_every == 0 or step == total):
                append_metrics(out_dir, {"step": step, **{k: round(v, 6) for k, v in sums.items()},
                                         "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                         "recycles": recycles, "sec_per_step": round(dt, 4)})
            if cfg.train.val_every and step % cfg.train.val_every == 0 and step < total:
                last_val = run_validation("periodic")
            if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == total or stop.requested:
                extra["wall_before"] += time.time() - started
                started = time.time()
                if d.main:
                    save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                    step=step, cfg=cfg, extra=extra)
            if stop.requested and step < total:
                status = EXIT_INTERRUPTED
                log.warning("stopped at step %d; continue with --resume", step)
                break
    bar.close()

    final_val = None
    if status == EXIT_OK:
        final_val = run_validation("final")
        if d.main:
            ctx = ema.applied(model) if ema is not None else contextlib.nullcontext()
            with ctx:
                export_model(out_dir, model, cfg)
    if d.main:
        wall = extra["wall_before"] + time.time() - started
        summary = {
            "adapter": cfg.adapter.method, "rank": cfg.adapter.rank if cfg.adapter.method in ("lorta", "lora") else None,
            "alpha": adapter_alpha(cfg) if cfg.adapter.method in ("lorta", "lora") else None,
            "config": cfg.name, "language_model": getattr(model, "lm_description", ""),
            "trainable_parameters": counts, "steps": step, "target_steps": total,
            "wall_time_s": round(wall, 2), "device": str(device), "processes": d.world,
            "status": {EXIT_OK: "completed", EXIT_DIVERGED: "diverged", EXIT_INTERRUPTED: "interrupted"}[status],
            "diverged": status == EXIT_DIVERGED, "divergence": divergence,
            "divergence_rule": f"non-finite loss or gradient norm, or loss > {cfg.train.diverge_loss_threshold}",
            "val_lddt_ca_initial": maybe((extra["val_initial"] or {}).get("lddt_ca")),
            "val_lddt_ca_final": maybe((final_val or {}).get("lddt_ca")),
            "val_final": final_val, "ema": bool(ema),
        }
        write_json_atomic(out_dir / "summary.json", summary)
        plot_training_curves(out_dir)
        log.info("wrote %s (status: %s, LDDT-Ca %s -> %s)", out_dir, summary["status"],
                 fmt(summary["val_lddt_ca_initial"]), fmt(summary["val_lddt_ca_final"]))
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status, model


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
        raise ValueError(f"effective_batch_size {eff} is not a multiple of batch_size×processes = {per_step}")
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


RESUME_KEYS = ("model", "adapter", "loss", "optim", "data")


def check_resumable(cfg: mlc.ConfigDict, saved: mlc.ConfigDict) -> None:
    """Only train.steps (and logging/validation cadence) may change on resume."""
    diffs = [k for k in RESUME_KEYS if json.dumps(cfg[k].to_dict(), sort_keys=True, default=str)
             != json.dumps(saved[k].to_dict(), sort_keys=True, default=str)]
    for k in ("seed", "batch_size", "effective_batch_size", "crop_size", "max_recycles"):
        if cfg.train[k] != saved.train[k]:
            diffs.append(f"train.{k}")
    if diffs:
        raise ValueError(f"cannot resume: the configuration differs from the checkpoint's in {', '.join(diffs)}")


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def setup_file_logging(out_dir: Path) -> logging.Handler:
    """RUN/train.log receives the package's log records (INFO and up) while the run lasts."""
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("esmfold_peft")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"

