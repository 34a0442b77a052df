"""Run directories: training checkpoints (exact resume), the exported model, and loading them back.

    RUN/config.json                  the resolved configuration
    RUN/checkpoints/last.pt          everything needed to resume exactly (written atomically)
    RUN/checkpoints/best.pt          the checkpoint of the best validation (a copy of a last.pt)
    RUN/model/fold_model.safetensors trunk + heads (+ the LM when it was fully trained)
    RUN/model/init_from.json         fine-tuning runs: SHA-256 of the pretrained ESMFold file
    RUN/adapter/                     the adapter in the core's format (lorta / lora runs)
    RUN/trunk_adapter/               the trunk's adapter (adapter.scope trunk / both)
    RUN/metrics.jsonl, RUN/summary.json

Checkpoints hold only what training changes (optimizer, scheduler, EMA, RNG states, step, and
the tensors below); the frozen language model is rebuilt from its source. A run trained from
scratch saves every non-LM tensor. A run started from a pretrained ESMFold (`model.init_from`)
saves only its trainable tensors and adapters: the frozen trunk and heads are rebuilt from that
file, which must be the one the run recorded (its SHA-256, checked on every load). For ESMFold
3B that is megabytes per checkpoint instead of gigabytes. They load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc
import numpy as np
import torch

from ...adapters import get_adapter_set, has_adapters, is_adapted, is_adapter_param, load_adapter, save_adapter
from ...atomic import write_json_atomic
from ...runtime.artifacts import (check_tensors, load_safetensors, read_json, save_safetensors, sha256_file, torch_load,
                                 torch_save)
from ...runtime.errors import ArtifactError, UserError

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
FOLD_WEIGHTS = "fold_model.safetensors"
PRETRAINED_RECORD = "init_from.json"
ADAPTER_DIRS = {"esm": "adapter", "trunk": "trunk_adapter"}  # where each adapted part's adapter is exported
# a checkpoint's top level: key -> type
CHECKPOINT_KEYS = {"format": int, "step": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
                   "rng": dict, "extra": dict}


class CheckpointError(UserError):
    """A run directory or checkpoint that cannot be used (its message names the file and the fault)."""


def trained_state(model, pretrained_base: bool = False) -> dict:
    """Tensors training can change: everything outside the LM, plus the LM's trainable ones and adapters.

    With a `pretrained_base` (the run started from `model.init_from`), only the trainable tensors
    and the adapters: the rest is rebuilt from that file (`restore_pretrained`).
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def changes(k: str) -> bool:
        if k in trainable or is_adapter_param(k):
            return True
        return not pretrained_base and not k.startswith("esm.")

    return {k: v.detach().clone() for k, v in model.state_dict().items() if changes(k)}


def needs_pretrained_base(model, state: dict) -> bool:
    """Whether `state` leaves non-LM tensors of `model` to a pretrained base (a fine-tuning run's state)."""
    return any(k not in state for k in model.state_dict() if not k.startswith("esm."))


@dataclass(frozen=True)
class PretrainedRecord:
    """What a fine-tuning run records of its `model.init_from` file (in its checkpoints and model/init_from.json)."""

    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> "PretrainedRecord":
        path = Path(path).expanduser()
        return cls(sha256_file(path), path.stat().st_size)

    @classmethod
    def from_dict(cls, data, source: str) -> Optional["PretrainedRecord"]:
        """The record as a checkpoint or init_from.json holds it (None: none recorded)."""
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) or \
                not isinstance(data.get("bytes"), int):
            raise ArtifactError(source, "damaged record of the pretrained ESMFold (needs sha256 and bytes)")
        return cls(data["sha256"], data["bytes"])

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}

    def matches(self, path: Path) -> bool:
        return path.stat().st_size == self.bytes and sha256_file(path) == self.sha256


def restore_pretrained(model, cfg: mlc.ConfigDict, state: Optional[dict], record: Optional[PretrainedRecord] = None,
                       source: str = "") -> bool:
    """The one place a run's pretrained base comes back: give `model` the weights of `model.init_from`.

    A new run (`state` None) starts from the file. A run's saved tensors (`state`: a checkpoint or its
    exported model) that hold only what trains get the frozen rest from the file, which must be the
    one the run recorded (`record`, its SHA-256; a moved file is given with `--set model.init_from=PATH`).
    Returns whether a base was loaded (then `state` need not hold every non-LM tensor).
    """
    if not cfg.model.get("init_from") or (state is not None and not needs_pretrained_base(model, state)):
        return False
    from .esmfold_read import init_from_checkpoint

    path = Path(str(cfg.model.init_from)).expanduser()
    if state is not None and not path.is_file():
        raise CheckpointError(f"{source}: needs the pretrained ESMFold it was fine-tuned from, "
                              f"model.init_from={path}, which is not a file (moved? give its place with "
                              "--set model.init_from=PATH)")
    if state is not None and record is not None and not record.matches(path):
        raise ArtifactError(path, f"not the pretrained ESMFold {source} was fine-tuned from (its SHA-256 "
                                  f"differs from the recorded {record.sha256[:16]}…)")
    init_from_checkpoint(model, cfg)
    return True


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, ema, step: int, cfg: mlc.ConfigDict,
                    extra: dict) -> None:
    """Atomically, with a SHA-256 sidecar (`runtime.artifacts`)."""
    torch_save({
        "format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(),
        "model": trained_state(model, pretrained_base=bool(cfg.model.get("init_from"))),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(), "extra": extra,
    }, path)


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, verified: checksum, structure, floating-point finite weights and EMA."""
    path = Path(path)
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict):
        raise ArtifactError(path, f"not a training checkpoint (a {type(ckpt).__name__}, expected a dict)")
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            raise ArtifactError(path, f"not a training checkpoint of this project (no valid {key!r} entry)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ArtifactError(path, f"checkpoint format {ckpt['format']}, expected {CHECKPOINT_FORMAT}")
    check_tensors(ckpt["model"], path)
    ema = ckpt.get("ema")
    if ema is not None:
        if not isinstance(ema, dict) or not isinstance(ema.get("shadow"), dict):
            raise ArtifactError(path, "damaged EMA entry")
        check_tensors(ema["shadow"], path)
    return ckpt


def load_trained_state(model, state: dict, source: str, base_loaded: bool = False) -> None:
    """Load a run's tensors; every non-LM tensor must be there unless a pretrained base was loaded first."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [] if base_loaded else sorted(k for k in own if not k.startswith("esm.") and k not in state)
    if unknown or shapes or missing:
        raise CheckpointError(f"{source}: does not fit the model built from its config: "
                              f"unknown {unknown[:5]}, shape mismatches {shapes[:5]}, missing {missing[:5]}")
    model.load_state_dict(state, strict=False)


def export_model(run_dir: Path, model, stored_config: dict, pretrained: Optional[PretrainedRecord] = None) -> list:
    """The final model for prediction: fold weights (no adapter tensors) + one adapter directory per adapted part.

    `pretrained`: a fine-tuning run's record of its `model.init_from` file; the fold weights then hold
    only the tensors training changed. Returns the folders written.
    """
    state = {k: v.contiguous() for k, v in trained_state(model, pretrained_base=pretrained is not None).items()
             if not is_adapter_param(k)}
    out = Path(run_dir) / "model"
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / FOLD_WEIGHTS)
    if pretrained is not None:
        write_json_atomic(out / PRETRAINED_RECORD, pretrained.to_dict())
    write_json_atomic(out / "config.json", stored_config)
    written = [out]
    for part, directory in ADAPTER_DIRS.items():
        if has_adapters(getattr(model, part)):
            written.append(save_adapter(get_adapter_set(getattr(model, part)), Path(run_dir) / directory))
    return written


def load_trained_model(run_dir: Path, checkpoint: Optional[Path] = None, use_ema: bool = True,
                       overrides: Sequence[str] = (), allow_other_base: bool = False):
    """(model, cfg) from a run directory: its exported model, or a given training checkpoint.

    `overrides` (`key=value`) change the run's config for this use, e.g. a moved language model
    (`model.lm.path=…`) or the trunk's chunk size. Every file read is verified. The exported adapters
    are refused on frozen weights other than those they were trained on (a language model replaced
    with `--set model.lm.path=…`) unless `allow_other_base` (`--allow-other-base`).
    """
    from ..model.build import build_model
    from .config import USE_FREE
    from .resolve import read_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg = read_run_config(run_dir, overrides, use_overrides=USE_FREE)
    method = cfg.adapter.method
    weights = run_dir / "model" / FOLD_WEIGHTS
    if weights.exists() and not weights.is_file():
        raise ArtifactError(weights, "not a file (a directory or special file)")
    if checkpoint is None and not weights.is_file():
        last = run_dir / "checkpoints" / LAST
        if not last.is_file():
            raise CheckpointError(f"{run_dir}: has neither an exported model nor a checkpoint (did the run finish?)")
        checkpoint = last
    if checkpoint is not None:
        ckpt = read_checkpoint(Path(checkpoint))
        model = build_model(cfg)
        record = PretrainedRecord.from_dict(ckpt["extra"].get("init_from"), str(checkpoint))
        base = restore_pretrained(model, cfg, ckpt["model"], record, str(checkpoint))
        load_trained_state(model, ckpt["model"], str(checkpoint), base_loaded=base)
        if use_ema and ckpt.get("ema"):
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in ckpt["ema"]["shadow"].items():
                    if name not in params or params[name].shape != value.shape:
                        raise ArtifactError(checkpoint, f"EMA tensor {name!r} does not fit the model")
                    params[name].copy_(value)
        return model, cfg
    # exported model: build without an adapter, load fold weights, then the saved adapter
    state = load_safetensors(weights)
    bare = mlc.ConfigDict(cfg.to_dict())
    if is_adapted(method):
        bare.adapter.method = "none"
    model = build_model(bare)
    record_path = run_dir / "model" / PRETRAINED_RECORD
    record = PretrainedRecord.from_dict(read_json(record_path), str(record_path)) if record_path.exists() else None
    base = restore_pretrained(model, cfg, state, record, str(weights))
    load_trained_state(model, state, str(weights), base_loaded=base)
    if is_adapted(method):
        scope = cfg.adapter.scope
        for part in (("esm",) if scope == "lm" else ("trunk",) if scope == "trunk" else ("esm", "trunk")):
            load_adapter(getattr(model, part), run_dir / ADAPTER_DIRS[part], name="default",
                         allow_other_base=allow_other_base)
    return model, cfg
