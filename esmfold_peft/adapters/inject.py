"""Attaching adapters to a model: forward hooks on the q/k/v/o projections, freezing, merging.

The base model keeps its structure and parameter names: each targeted `nn.Linear` gets a forward
hook that adds the active adapter's Δy to its output, and the adapters live in one submodule,
`model.peft` (an `AdapterSet`), so they are saved with the model, seen by optimizers and by DDP.
Several named adapters can sit on one model; one is active at a time. Merging folds the active
adapter into the base weights and removes the hooks, so a merged model runs the base model's code.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from .config import LoRAConfig, LoRTAConfig
from .layouts import MATRICES, AttentionLayout, detect_layout, prepare_model
from .lora import LoRA
from .lorta import LoRTA

PEFT_ATTR = "peft"
ADAPTER_CLASSES = {"lorta": LoRTA, "lora": LoRA}
AnyConfig = Union[LoRTAConfig, LoRAConfig]


class AdapterError(RuntimeError):
    pass


class AdapterSet(nn.Module):
    """The named adapters of one model, the hooks that apply the active one, and merge state."""

    def __init__(self, layout: AttentionLayout):
        super().__init__()
        self.layout = layout
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.merged: Optional[str] = None
        self._enabled = True
        self._handles: List = []
        # (layer, matrix) -> the model's nn.Linear; a plain dict, not submodules (they belong to the
        # model), which deepcopy and pickle map consistently with the model's own copies
        self._linears: Dict[tuple, nn.Linear] = {}

    def bind(self, model: nn.Module) -> None:
        self._linears = {(layer, m): model.get_submodule(self.layout.projection_path(layer, m))
                         for layer in range(self.layout.n_layers) for m in MATRICES}

    # --- hooks --------------------------------------------------------------------------------------

    def _hook(self, layer: int, matrix: str, module, args, output):
        if not self._enabled or self.active is None:
            return None
        adapter = self.adapters[self.active]
        if matrix not in adapter.targets:
            return None
        return output + adapter.delta(args[0], layer, matrix).to(output.dtype)

    def _install_hooks(self) -> None:
        if self._handles:
            return
        for (layer, m), lin in self._linears.items():
            self._handles.append(lin.register_forward_hook(partial(self._hook, layer, m)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for a in self.adapters.values():
            a.clear_cache()

    # --- adapters -----------------------------------------------------------------------------------

    def add(self, name: str, config: AnyConfig) -> nn.Module:
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} already exists (methods: {self.describe()})")
        if "." in name or not name:
            raise AdapterError(f"adapter names must be non-empty and contain no '.': {name!r}")
        if not self._linears:
            raise AdapterError("this AdapterSet is not bound to a model (use attach)")
        device = next(iter(self._linears.values())).weight.device
        adapter = ADAPTER_CLASSES[config.method](config, self.layout, device=device)
        self.adapters[name] = adapter
        if self.active is None:
            self.set_active(name)
        return adapter

    def set_active(self, name: Optional[str]) -> None:
        if self.merged is not None and name != self.merged:
            raise AdapterError(f"adapter {self.merged!r} is merged; unmerge it before activating {name!r}")
        if name is not None and name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; have: {', '.join(self.adapters) or 'none'}")
        self.active = name

    def remove(self, name: str) -> None:
        if self.merged == name:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it first")
        del self.adapters[name]
        if self.active == name:
            self.active = next(iter(self.adapters), None)

    def get(self, name: Optional[str] = None) -> nn.Module:
        name = name or self.active
        if name is None or name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; have: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def describe(self) -> Dict[str, str]:
        return {n: a.method for n, a in self.adapters.items()}

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model (e.g. a DPO reference) without removing anything."""
        if self.merged is not None:
            raise AdapterError("cannot disable a merged adapter; unmerge it first")
        before, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = before

    # --- dense views and merging --------------------------------------------------------------------

    def delta_weight(self, layer: int, matrix: str, name: Optional[str] = None) -> torch.Tensor:
        adapter = self.get(name)
        if matrix not in adapter.targets:
            out_f, in_f = self.layout.linear_shape(matrix)
            return torch.zeros(out_f, in_f)
        return adapter.delta_weight(layer, matrix)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        adapter = self.get()
        for layer in range(self.layout.n_layers):
            for m in adapter.targets:
                lin = self._linears[(layer, m)]
                dw = adapter.delta_weight(layer, m).to(device=lin.weight.device, dtype=torch.float64)
                lin.weight.copy_((lin.weight.double() + sign * dw).to(lin.weight.dtype))

    def merge(self) -> None:
        """Fold the active adapter into the base weights; the model then runs the base code path."""
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is already merged")
        self._fold(+1.0)
        self.merged = self.active
        self._remove_hooks()

    def unmerge(self) -> None:
        if self.merged is None:
            raise AdapterError("no adapter is merged")
        self._fold(-1.0)
        self.merged = None
        self._install_hooks()


def attach(model: nn.Module, layout: Optional[AttentionLayout] = None) -> AdapterSet:
    """The model's AdapterSet, created (with layout detection and hooks) on first use."""
    existing = getattr(model, PEFT_ATTR, None)
    if isinstance(existing, AdapterSet):
        if layout is not None and layout.differences(existing.layout):
            raise AdapterError("model already has adapters with another layout: "
                               + "; ".join(layout.differences(existing.layout)))
        return existing
    if existing is not None:
        raise AdapterError(f"model already has an attribute {PEFT_ATTR!r} that is not an AdapterSet")
    if layout is None or not layout.layer_paths:
        detected = detect_layout(model, family=layout.family if layout else None)
        if layout is not None and layout.differences(detected):
            raise AdapterError("the given layout does not match the model: " + "; ".join(layout.differences(detected)))
        layout = detected
    prepare_model(model, layout)
    aset = AdapterSet(layout)
    aset.bind(model)
    model.add_module(PEFT_ATTR, aset)
    aset._install_hooks()
    return aset


def get_adapter_set(model: nn.Module) -> AdapterSet:
    aset = getattr(model, PEFT_ATTR, None)
    if not isinstance(aset, AdapterSet):
        raise AdapterError(f"{type(model).__name__} has no adapters (use add_adapter first)")
    return aset


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's."""
    aset = getattr(model, PEFT_ATTR, None)
    adapter_params = {id(p) for p in aset.parameters()} if isinstance(aset, AdapterSet) else set()
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)


def add_adapter(model: nn.Module, config: AnyConfig, name: str = "default",
                layout: Optional[AttentionLayout] = None, freeze: bool = True) -> nn.Module:
    """Add a named adapter (LoRTA or LoRA) to `model` and return it.

    With `freeze=True` the base weights are frozen and exactly the adapters stay trainable; the
    caller may unfreeze more afterwards (e.g. a classifier head). The model's outputs are unchanged
    until the adapter is trained (its update is zero at initialisation).
    """
    aset = attach(model, layout)
    adapter = aset.add(name, config)
    if freeze:
        freeze_base(model)
    return adapter


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove all adapters (merging the active one first if asked) and return the bare base model."""
    aset = get_adapter_set(model)
    if merge and aset.merged is None and aset.active is not None:
        aset.merge()
    aset._remove_hooks()
    delattr(model, PEFT_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
