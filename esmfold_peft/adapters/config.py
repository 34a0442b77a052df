"""Adapter configurations: plain dataclasses, serialised into `adapter_config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

import torch

from .layouts import MATRICES

TENSOR_MODES: Tuple[str, ...] = ("heads", "matrices", "layers")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterConfigError(ValueError):
    pass


@dataclass
class _Common:
    rank: int = 8
    alpha: float = 16.0  # update scale is alpha / rank
    targets: Tuple[str, ...] = MATRICES
    dropout: float = 0.0  # on the adapter's input
    dtype: str = "float32"

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if int(self.rank) != self.rank or self.rank < 1:
            raise AdapterConfigError(f"rank must be a positive integer, got {self.rank}")
        self.rank = int(self.rank)
        bad = [t for t in self.targets if t not in MATRICES]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise AdapterConfigError(f"targets must be distinct names among {MATRICES}, got {self.targets}")
        self.targets = tuple(m for m in MATRICES if m in self.targets)  # canonical order q,k,v,o
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise AdapterConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return d


@dataclass
class LoRTAConfig(_Common):
    """LoRTA: one CP tensor over (d, d_H, H, L, matrices) (SPEC §1).

    `modes` says which modes the tensor shares beyond the two weight dimensions (paper Table 2):
    ("heads",) = one tensor per layer and matrix; ("heads", "matrices") = one per layer;
    ("heads", "matrices", "layers") = one for the whole model (the default, full LoRTA).
    `implementation="dense"` materialises ΔW each call, as the public reference code does; it exists
    for benchmarks and cross-checks only.
    """

    method = "lorta"
    modes: Tuple[str, ...] = TENSOR_MODES
    implementation: str = "factored"

    def __post_init__(self):
        super().__post_init__()
        modes = tuple(self.modes)
        bad = [m for m in modes if m not in TENSOR_MODES]
        if bad or len(set(modes)) != len(modes):
            raise AdapterConfigError(f"modes must be distinct names among {TENSOR_MODES}, got {modes}")
        if "heads" not in modes:
            raise AdapterConfigError("LoRTA always tensorises heads; without them the update is LoRA (use LoRAConfig)")
        self.modes = tuple(m for m in TENSOR_MODES if m in modes)
        if self.implementation not in ("factored", "dense"):
            raise AdapterConfigError(f"implementation must be 'factored' or 'dense', got {self.implementation!r}")


@dataclass
class LoRAConfig(_Common):
    """LoRA baseline: ΔW = (alpha/r)·B A per targeted matrix, B zero-initialised."""

    method = "lora"


CONFIGS = {"lorta": LoRTAConfig, "lora": LoRAConfig}


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Adapter inputs follow the adapter's dtype, except under autocast, which decides itself."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def config_from_dict(d: dict):
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIGS:
        raise AdapterConfigError(f"unknown adapter method {method!r}; known: {', '.join(CONFIGS)}")
    cls = CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise AdapterConfigError(f"unknown {method} config keys: {', '.join(sorted(unknown))}")
    return cls(**d)
