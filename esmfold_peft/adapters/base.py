"""What every adapter method is, and the one registry of methods.

A method is a config dataclass (`config.py`) and an adapter module over one attention layout
(`layouts.py`). The module sees *logical* projections: matrix `m` of layer `l`, an
`nn.Linear`-shaped map of `layout.linear_shape(m)` (out × in), heads on the output of q/k/v and on
the input of o. Where those rows sit in the model (a Linear of their own, or a slice of a fused
one) is the layout's business, not the method's.

Everything else (hooks, merging, saving, counting) goes through this protocol only, so a new
method is one module plus one line in `_REGISTRY`.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Iterator, NamedTuple, Protocol, Tuple, Type, runtime_checkable

import torch
from torch import nn

from .config import AdapterConfigError, LoRAConfig, LoRTAConfig
from .layouts import AttentionLayout
from .lora import LoRA
from .lorta import LoRTA


PEFT_ATTR = "peft"  # the model's attribute (and state-dict prefix) that holds its AdapterSet


@runtime_checkable
class Adapter(Protocol):
    """The interface of one method's adapter over one layout (an `nn.Module`)."""

    method: ClassVar[str]  # the name in adapter_config.json ("lorta", "lora")
    config: object  # the method's config dataclass
    layout: AttentionLayout
    targets: Tuple[str, ...]  # the adapted matrices among q, k, v, o

    def delta(self, x: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        """Δy = x ΔWᵀ for inputs `x` (…×in) of `matrix` in `layer`, without forming ΔW."""

    def delta_weight(self, layer: int, matrix: str) -> torch.Tensor:
        """Dense ΔW (out × in, nn.Linear orientation): for merging, inspection and tests only."""

    def saved_tensors(self) -> Dict[str, torch.Tensor]:
        """The parameters under their file names in adapter_model.safetensors (each stored once)."""

    def clear_cache(self) -> None:
        """Drop activations kept between the calls of one forward (called when hooks go away)."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        ...

    @staticmethod
    def formula_num_parameters(config, layout: AttentionLayout) -> int:
        """The closed-form trainable-parameter count, for cross-checks."""


class Method(NamedTuple):
    config_class: type
    adapter_class: Type[nn.Module]


_REGISTRY: Dict[str, Method] = {cls.method: Method(cfg, cls) for cfg, cls in ((LoRTAConfig, LoRTA), (LoRAConfig, LoRA))}
assert all(m.config_class.method == name for name, m in _REGISTRY.items())

METHODS: Tuple[str, ...] = tuple(_REGISTRY)


def is_adapted(cfg_or_method) -> bool:
    """Whether a run config (its `adapter.method`) or a method name puts an adapter of this registry on the model
    (lorta, lora), rather than none (frozen) or full (fine-tuned without an adapter)."""
    name = cfg_or_method if isinstance(cfg_or_method, str) else cfg_or_method.adapter.method
    return name in _REGISTRY


def is_adapter_param(name: str) -> bool:
    """Whether a parameter or state-dict name (of any model, at any depth) belongs to an adapter set."""
    return f".{name}".find(f".{PEFT_ATTR}.") >= 0


def method(name: str) -> Method:
    """The config and adapter classes of a method name; an unknown name is an AdapterConfigError."""
    if name not in _REGISTRY:
        raise AdapterConfigError(f"unknown adapter method {name!r}; known: {', '.join(METHODS)}")
    return _REGISTRY[name]


def config_from_dict(d: dict):
    """The config a dict describes (`to_dict`'s output); unknown keys or values are AdapterConfigErrors."""
    d = dict(d)
    name = d.pop("method", None)
    cls = method(name).config_class
    unknown = set(d) - {f.name for f in cls.__dataclass_fields__.values()}
    if unknown:
        raise AdapterConfigError(f"unknown {name} config keys: {', '.join(sorted(unknown))}")
    return cls(**d)


def build_adapter(config, layout: AttentionLayout, device=None) -> nn.Module:
    """An adapter module for a layout alone (no model), e.g. to count its parameters."""
    return method(config.method).adapter_class(config, layout, device=device)
