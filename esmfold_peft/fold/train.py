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
from pathlib import Path
from typing import Iterable, Optional

import ml_collections as mlc
import numpy as np
import torch
import torch.distributed as dist

from ..adapters import has_adapters, is_adapted
from ..data import ChainDataset, ChainFilter, build_cache, collate, demo_source, directory_source, openfold_source
from ..data.dataset import WeightedBatchSampler
from ..data.demo import ensure_demo_data
from ..runtime.errors import ConfigError, UserError
from ..runtime.loop import Context, Schedule, StepResult, TrainingTask, run_training
from ..runtime.rundir import RunDir
from ..runtime.session import Dist, autocast_for, step_seed
from ..runtime.text import finite_or_none
from .model.build import build_model, parameter_counts, part_of
from .run.checkpoint import (ADAPTER_DIRS, PretrainedRecord, export_model, load_trained_state, read_checkpoint,
                             restore_pretrained, save_checkpoint, set_rng_state)
from .run.config import adapter_alpha, check_new_run
from .run.sketch import Sketch
from .model.losses import fold_loss
from .plots import plot_training_curves
from .run.resolve import check_resumable_config, finish, stored_form
from .validate import validate, validation_baselines

log = logging.getLogger("esmfold_peft.train")
SKETCH_CHAINS = 20_000  # training chains whose k-mers a run's routing sketch holds (the first ones)


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


def training_sketch(train: ChainDataset, limit: int = SKETCH_CHAINS) -> Sketch:
    """The k-mer sketch of the training chains (the first `limit` of them), stored with a run's adapters."""
    return Sketch.of(train.cache.sequence(i) for i in range(min(len(train), limit)))


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


# --- the step: the one callable the task and the benchmarks run ----------------------------------

def fold_step(model, micro_batches: Iterable[dict], optimizer, params, cfg: mlc.ConfigDict, *, recycles: int,
              device, bf16: bool = False, accum: int = 1, scheduler=None, ema: Optional[EMA] = None, named=None,
              d: Optional[Dist] = None) -> StepResult:
    """One optimizer step of the folding model over `accum` micro-batches (each a collated batch on `device`
    with its `use_clamped_fape` draw): forward with `recycles`, `fold_loss`, backward (DDP synchronises the
    last micro-batch only), gradient-norm clipping, the divergence rule (agreed by every process), then
    Adam, the schedule and the EMA. A diverged step changes no parameter."""
    d = d or Dist()
    sums: dict = {}
    bad = None
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(micro_batches):
        last = micro == accum - 1
        sync = contextlib.nullcontext() if (d.world == 1 or last) else model.no_sync()
        with sync:
            with autocast_for(device, bf16):
                out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=recycles)
                loss, terms = fold_loss(out, batch, cfg.loss)
            bad = bad or divergence_reason(terms["loss"], cfg)
            if bad is None:
                (loss / accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v / accum
    grad_norm = None
    if bad is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm))
        if not math.isfinite(grad_norm):
            bad = f"non-finite gradient norm ({grad_norm})"
    bad = agree(bad, d, device)
    if bad is not None:
        return StepResult(sums, grad_norm, divergence=bad)
    optimizer.step()
    scalars = {"recycles": recycles}
    if scheduler is not None:
        scheduler.step()
        scalars = {"lr": scheduler.get_last_lr()[0], **scalars}
    if ema is not None:
        ema.update(named)
    return StepResult(sums, grad_norm, scalars=scalars)


# --- the folding task on the run loop -------------------------------------------------------------

class FoldTask(TrainingTask):
    """Folding runs on `runtime.loop`: data, model (pretrained base included), AF2 optimizer, EMA, DDP."""

    application = "fold"
    metrics_key = "val"
    monitor = "lddt_ca"
    monitor_label = "LDDT-Ca"
    higher_is_better = True
    distributed = True

    def __init__(self, cfg: mlc.ConfigDict, checked: bool = False):
        super().__init__(cfg)
        self.checked = checked  # cfg was checked for this run directory when it was resolved
        self.net = self.ddp = self.ema = self.data = None
        self.init_from = None  # a fine-tuning run's record of its pretrained file (SHA-256)

    def schedule(self) -> Schedule:
        return Schedule.of(self.cfg.train, self.cfg.train.val_every)

    def description(self) -> str:
        return f"train {self.cfg.adapter.method}"

    def model(self):
        return self.net

    def prepare(self, run: RunDir, resume: bool) -> dict:
        if resume and not self.checked:  # (checked: resolved for this run directory by run.resolve)
            check_resumable_config(run.path, self.cfg)
        elif not self.checked:
            check_new_run(self.cfg)
        return stored_form(self.cfg, run.path)

    def setup(self, ctx: Context, checkpoint: Optional[Path]):
        cfg, d = self.cfg, ctx.d
        self.ctx, self.bf16 = ctx, bool(cfg.train.bf16) and ctx.device.type == "cuda"
        ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if d.main and cfg.data.source == "demo":
            ensure_demo_data(cfg.data.root, log=lambda m: log.info("demo data: %s", m))
        if d.world > 1:
            dist.barrier()
        self.accum = accumulation_steps(cfg, d.world)
        seed_everything(cfg.train.seed + d.rank)
        if d.main:  # one process parses and caches; the others then open the same cache
            self.train_ds, self.val_ds = build_datasets(cfg, True, ctx.progress)
        if d.world > 1:
            dist.barrier()
        if not d.main:
            self.train_ds, self.val_ds = build_datasets(cfg, False)
        model = self.net = self._build(ckpt, str(checkpoint), d).to(ctx.device)
        self.counts = parameter_counts(model)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        o = cfg.optim
        self.optimizer = torch.optim.Adam(param_groups(self.named, cfg), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, af2_lr_lambda(cfg))
        self.ema = EMA(self.named, o.ema_decay) if o.ema_decay else None
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if d.world > 1 else model)
        if d.main:
            log.info("device %s, %d process(es), %d micro-batch(es) of %d per step; trainable parameters: %s",
                     ctx.device, d.world, self.accum, cfg.train.batch_size, self.counts)
        if ckpt is None:
            return None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        return ckpt["step"], ckpt["extra"]

    def _build(self, ckpt: Optional[dict], source: str, d: Dist):
        """The model with its trained tensors: a new run's from `model.init_from` (recorded by SHA-256), a
        resumed run's from its checkpoint (a fine-tuning run's frozen rest from the recorded pretrained file)."""
        cfg = self.cfg
        model = build_model(cfg)
        if ckpt is None:
            if restore_pretrained(model, cfg, None) and d.main:  # only the main process writes checkpoints
                self.init_from = PretrainedRecord.of(cfg.model.init_from)
            return model
        self.init_from = PretrainedRecord.from_dict(ckpt["extra"].get("init_from"), source)
        base = restore_pretrained(model, cfg, ckpt["model"], self.init_from, source)
        load_trained_state(model, ckpt["model"], source, base_loaded=base)
        return model

    def train_step(self, step: int) -> StepResult:
        cfg, d = self.cfg, self.ctx.d
        if self.data is None:  # the order depends only on (seed, step): a resumed run draws what a straight one does
            sampler = WeightedBatchSampler(self.train_ds.cache.weights, cfg.train.batch_size, cfg.train.seed,
                                           rank=d.rank, world_size=d.world)
            self.data = batches(self.train_ds, sampler, step * self.accum, cfg.data.num_workers)
        recycles = int(torch.randint(0, cfg.train.max_recycles + 1, (1,),
                                     generator=torch.Generator().manual_seed(step_seed(cfg.train.seed + 1, step))))

        def micro_batches():
            for micro in range(self.accum):
                batch = next(self.data)
                batch["use_clamped_fape"] = clamp_draw(cfg, step * self.accum + micro, d)
                yield {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

        return fold_step(self.ddp, micro_batches(), self.optimizer, self.params, cfg, recycles=recycles,
                         device=self.ctx.device, bf16=self.bf16, accum=self.accum, scheduler=self.scheduler,
                         ema=self.ema, named=self.named, d=d)

    def _weights(self):
        return self.ema.applied(self.net) if self.ema is not None else contextlib.nullcontext()

    def validate(self) -> Optional[dict]:
        if self.val_ds is None or not self.ctx.d.main:
            return None
        with self._weights():
            res = validate(self.net, self.val_ds, self.ctx.device, num_recycles=self.cfg.val.num_recycles,
                           bf16=self.bf16, max_chains=self.cfg.data.val_max_chains, progress=self.ctx.progress)
        res.pop("chains")
        return res

    def describe_validation(self, res: dict) -> str:
        return (f"LDDT-Ca {res['lddt_ca']:.4f} ({'EMA weights' if self.ema is not None else 'weights'}), "
                f"pooled over pairs {res['lddt_ca_pooled_all']:.4f}, mean pLDDT {res['mean_plddt']:.1f}")

    def save(self, path: Path, step: int, extra: dict) -> None:
        save_checkpoint(path, model=self.net, optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                        step=step, cfg=self.cfg,
                        extra={**extra, "init_from": self.init_from.to_dict() if self.init_from else None})

    def load_weights(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        load_trained_state(self.net, ckpt["model"], str(path), base_loaded=bool(self.cfg.model.init_from))
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])

    def export(self, run: RunDir) -> list:
        with self._weights():
            written = export_model(run.path, self.net, stored_form(self.cfg, run.path),
                                   pretrained=self.init_from if self.cfg.model.init_from else None)
        sketch = None
        for part, directory in ADAPTER_DIRS.items():
            if (run.path / directory).is_dir() and has_adapters(getattr(self.net, part)):
                sketch = sketch or training_sketch(self.train_ds)
                sketch.save(run.path / directory)  # what `--adapter auto` routes by (fold/run/sketch.py)
        return written

    def results(self, initial: Optional[dict], final: Optional[dict]) -> dict:
        cfg, adapted = self.cfg, is_adapted(self.cfg)
        return {
            "adapter": cfg.adapter.method, "rank": cfg.adapter.rank if adapted else None,
            "alpha": adapter_alpha(cfg) if adapted else None, "config": cfg.name,
            "language_model": getattr(self.net, "lm_description", ""),
            "trainable_parameters": getattr(self, "counts", None), "device": str(self.ctx.device) if hasattr(
                self, "ctx") else "",
            "divergence_rule": f"non-finite loss or gradient norm, or loss > {cfg.train.diverge_loss_threshold}",
            "val_lddt_ca_initial": finite_or_none((initial or {}).get("lddt_ca")),
            "val_lddt_ca_final": finite_or_none((final or {}).get("lddt_ca")),
            "val_final": final, "ema": bool(cfg.optim.ema_decay),
            "val_baselines": self._baselines(),
        }

    def _baselines(self) -> Optional[dict]:
        """The sequence-only baselines on the validation chains (computed once; the loop adds the margin)."""
        if getattr(self, "val_ds", None) is None:
            return None
        if not hasattr(self, "baselines"):
            self.baselines = validation_baselines(self.val_ds, self.cfg.data.val_max_chains)
        return self.baselines

    def plot(self, run: RunDir) -> None:
        plot_training_curves(run.path)


def train(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True,
          resolved: bool = False) -> int:
    """Train; return the process exit status (0 ok, 3 diverged, 130 interrupted)."""
    return train_model(cfg, out_dir, resume=resume, progress=progress, resolved=resolved)[0]


def train_model(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True,
                resolved: bool = False):
    """Train; return (exit status, the trained model as this process holds it).

    A new run needs a directory that holds no run (a failed start may be replaced); a resumed one
    continues from its checkpoint, or from step 0 when it stopped before its first checkpoint. The
    run contract (statuses, signals, divergence, the best model, loggers) is `runtime.loop`'s.
    `cfg` is resolved (α, default paths) and checked here, for a resume against the run's stored
    config; `resolved=True` says the caller did that already (`run.resolve.new_run_config` or
    `resume_run_config` for this run directory, as the scripts do): the config is resolved once.
    """
    task = FoldTask(cfg if resolved else finish(cfg), checked=resolved)
    status = run_training(task, out_dir, resume=resume, progress=progress)
    return status, task.model()


# --- helpers ------------------------------------------------------------------------------------

def param_groups(named: list, cfg: mlc.ConfigDict) -> list[dict]:
    """The optimizer's parameter groups: one, or with `optim.confidence_lr` the confidence heads in a group of
    their own at that rate (the scheduler scales both alike)."""
    rate = float(cfg.optim.get("confidence_lr", 0.0))
    heads = [p for n, p in named if part_of(n) == "confidence"] if rate else []
    if not heads:
        return [{"params": [p for _, p in named]}]
    return [{"params": [p for n, p in named if part_of(n) != "confidence"]}, {"params": heads, "lr": rate}]


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
