"""Adapter configurations: plain dataclasses, serialised into `adapter_config.json`.

Every field is checked when a config is made, so a bad value (from a flag, a config file or a
damaged `adapter_config.json`) fails at once with an `AdapterConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..runtime.errors import ConfigError
from .layouts import MATRICES

TENSOR_MODES: Tuple[str, ...] = ("heads", "matrices", "layers")
ALL_MODES = "all"  # --modes all = every tensor mode (full LoRTA)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterConfigError(ConfigError):
    """An adapter setting that cannot be used (rank, alpha, targets, modes, dtype, method)."""


def parse_modes(text: Union[str, Tuple[str, ...], list]) -> Tuple[str, ...]:
    """LoRTA's tensor modes from `heads,matrices,layers` (any comma-separated subset) or `all`.

    Returns the modes in canonical order; a sequence of names is accepted too (as stored in configs).
    Whether the subset is usable (LoRTA always needs `heads`) is `LoRTAConfig`'s check.
    """
    valid = f"a comma-separated subset of {','.join(TENSOR_MODES)}, or {ALL_MODES}"
    words = text.split(",") if isinstance(text, str) else text
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise AdapterConfigError(f"modes {text!r} not understood: expected {valid}")
    words = [w.strip() for w in words if w.strip()]
    if words == [ALL_MODES]:
        return TENSOR_MODES
    bad = [w for w in words if w not in TENSOR_MODES]
    if bad or not words:
        raise AdapterConfigError(f"modes {text!r} not understood: expected {valid}")
    if len(set(words)) != len(words):
        raise AdapterConfigError(f"modes {text!r} names a mode twice: expected {valid}")
    return tuple(m for m in TENSOR_MODES if m in words)


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class _Common:
    rank: int = 8
    alpha: Optional[float] = None  # update scale is alpha / rank; None = rank (scale 1), stored as the number
    targets: Tuple[str, ...] = MATRICES
    dropout: float = 0.0  # on the adapter's input
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, float)) or int(self.rank) != self.rank \
                or self.rank < 1:
            raise AdapterConfigError(f"rank must be a positive integer, got {self.rank!r}")
        self.rank = int(self.rank)
        # alpha = rank unless given: the CLI's default, and explicit in every saved config
        self.alpha = float(self.rank) if self.alpha is None else _number(self.alpha, "alpha")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise AdapterConfigError(f"targets must be a list of names among {MATRICES}, got {self.targets!r}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in MATRICES]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise AdapterConfigError(f"targets must be distinct names among {MATRICES}, got {self.targets}")
        self.targets = tuple(m for m in MATRICES if m in self.targets)  # canonical order q,k,v,o
        self.dropout = _number(self.dropout, "dropout")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise AdapterConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class LoRTAConfig(_Common):
    """LoRTA: one CP tensor over (d, d_H, H, L, matrices) per layout family.

    `modes` says which modes the tensor shares beyond the two weight dimensions (paper Table 2):
    ("heads",) = one tensor per layer and matrix; ("heads", "matrices") = one per layer;
    ("heads", "matrices", "layers") = one for the whole model (the default, full LoRTA). A string
    in the `--modes` syntax (`heads,matrices` or `all`) is accepted too.
    `implementation="dense"` materialises ΔW each call, as the public reference code does; it exists
    for benchmarks and cross-checks only.
    """

    method = "lorta"
    modes: Tuple[str, ...] = TENSOR_MODES
    implementation: str = "factored"

    def __post_init__(self):
        super().__post_init__()
        self.modes = parse_modes(self.modes)
        if "heads" not in self.modes:
            raise AdapterConfigError("LoRTA always tensorises heads; without them the update is LoRA (use LoRAConfig)")
        if self.implementation not in ("factored", "dense"):
            raise AdapterConfigError(f"implementation must be 'factored' or 'dense', got {self.implementation!r}")


@dataclass
class LoRAConfig(_Common):
    """LoRA baseline: ΔW = (alpha/r)·B A per targeted matrix, B zero-initialised."""

    method = "lora"


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Adapter inputs follow the adapter's dtype, except under autocast, which decides itself."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)
