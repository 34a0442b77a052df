"""A classification head trained beside an adapter: `head.safetensors` (+ `head_config.json`).

The NLP harness trains a task head (BERT's classifier and pooler, RoBERTa's classifier, Llama's
score) fully while the adapter adapts attention; both are needed to reproduce the trained network,
so `load_adapter` restores a head it finds beside the adapter, strictly (every tensor must be a
parameter of the model with the saved shape, checked before anything is copied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..atomic import atomic_write
from ..runtime.artifacts import load_safetensors, save_safetensors
from ..runtime.errors import ArtifactError
from .files import HEAD_CONFIG, HEAD_WEIGHTS, AdapterLoadError


def save_head(tensors: Dict[str, torch.Tensor], directory: Path, meta: Optional[dict] = None) -> Path:
    """Write a head's tensors (parameter name -> tensor) and what it is for; the weights' path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / HEAD_WEIGHTS)
    record = {**(meta or {}), "parameters": {n: list(v.shape) for n, v in tensors.items()}}
    atomic_write(directory / HEAD_CONFIG, lambda p: Path(p).write_text(json.dumps(record, indent=1) + "\n"))
    return directory / HEAD_WEIGHTS


def read_head(directory: Path) -> Dict[str, torch.Tensor]:
    """The head saved in `directory` ({} when there is none); damage is an AdapterLoadError."""
    path = Path(directory) / HEAD_WEIGHTS
    if not path.exists():
        return {}
    try:
        return load_safetensors(path)
    except ArtifactError as exc:
        raise AdapterLoadError(exc.path, exc.fault) from exc


def check_head(model: nn.Module, tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """Refuse (one line) a head whose tensors are not parameters of `model` of the same shapes."""
    params = dict(model.named_parameters())
    bad = [f"{n} {tuple(v.shape)}" + (f" vs {tuple(params[n].shape)}" if n in params else " (no such parameter)")
           for n, v in tensors.items() if n not in params or params[n].shape != v.shape]
    if bad:
        raise AdapterLoadError(path, f"the classification head saved here does not fit {type(model).__name__}: "
                                     + "; ".join(bad[:4]) + " (load_adapter(..., head=False) leaves it out)")


@torch.no_grad()
def copy_head(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, v in tensors.items():
        params[n].copy_(v.to(dtype=params[n].dtype, device=params[n].device))
