"""Saving and loading adapters: a directory with `adapter_config.json` + `adapter_model.safetensors`.

LoRTA's factors are stored once for the whole model (`lorta.A`, `lorta.B`, `lorta.C_H`, `lorta.C_L`,
`lorta.C_M`; shapes per tensor mode in `lorta.py`), LoRA's as `lora.{layer}.{matrix}.{A,B}`.
Loading is strict: a different layout, method, tensor name or shape is an error that says what
differs; nothing is loaded partially.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..atomic import atomic_write
from .config import config_from_dict
from .inject import AdapterSet, add_adapter, attach, freeze_base, get_adapter_set
from .layouts import AttentionLayout

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    pass


def save_adapter(model_or_set: Union[nn.Module, AdapterSet], directory: Union[str, os.PathLike],
                 name: Optional[str] = None) -> Path:
    """Write the named (default: active) adapter to `directory`, atomically per file."""
    aset = model_or_set if isinstance(model_or_set, AdapterSet) else get_adapter_set(model_or_set)
    adapter = aset.get(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "library": f"esmfold-peft {__version__}",
        "name": name or aset.active,
        "method": adapter.method,
        "config": adapter.config.to_dict(),
        "layout": aset.layout.describe(),
        "num_parameters": sum(p.numel() for p in adapter.parameters()),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.saved_tensors().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"method": adapter.method}))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: Union[str, os.PathLike]) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"no {CONFIG_NAME} in {directory} (is this an adapter directory?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {exc}") from exc
    for key in ("method", "config", "layout"):
        if key not in meta:
            raise AdapterLoadError(f"{path} lacks the key {key!r}")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise AdapterLoadError(f"{path} has format_version {meta['format_version']}; this library reads "
                               f"up to {FORMAT_VERSION}")
    return meta


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], name: str = "default",
                 layout: Optional[AttentionLayout] = None, freeze: bool = True,
                 activate: bool = True) -> nn.Module:
    """Load an adapter saved by `save_adapter` into `model` under `name`; strict."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config = config_from_dict({**meta["config"], "method": meta["method"]})
    saved_layout = AttentionLayout(**meta["layout"])
    aset = attach(model, layout)
    diffs = saved_layout.differences(aset.layout)
    if diffs:
        raise AdapterLoadError(f"adapter in {directory} was made for another attention layout "
                               f"(saved vs model): {'; '.join(diffs)}")
    if name in aset.adapters:
        existing = aset.adapters[name]
        raise AdapterLoadError(f"the model already has an adapter named {name!r} ({existing.method}); "
                               f"load under another name or remove it first")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterLoadError(f"no {WEIGHTS_NAME} in {directory}")
    tensors = load_file(str(weights_path))
    adapter = add_adapter(model, config, name=name, layout=None, freeze=False)
    try:
        _copy_strict(adapter, tensors, directory)
    except AdapterLoadError:
        aset.remove(name)
        raise
    if activate:
        aset.set_active(name)
    if freeze:
        freeze_base(model)
    return adapter


def _copy_strict(adapter: nn.Module, tensors: dict, directory: Path) -> None:
    expected = adapter.saved_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: saved {tuple(tensors[k].shape)} vs expected {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else ""))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:8]))
    if problems:
        raise AdapterLoadError(f"adapter weights in {directory} do not match its {adapter.method} config: "
                               + " | ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))
