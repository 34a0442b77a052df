"""Attaching adapters to a model: forward hooks on the attention projections, freezing, merging.

The base model keeps its structure and parameter names: each projection `nn.Linear` gets a forward
hook that adds the active adapter's Δy to its output, and the adapters live in one submodule,
`model.peft` (an `AdapterSet`), so they are saved with the model, seen by optimizers and by DDP.
Several named adapters can sit on one model; one is active at a time. Merging folds the active
adapter into the base weights and removes the hooks, so a merged model runs the base model's code.

A set covers one layout family, or several (ESMFold's trunk: `esmfold-seq` and `esmfold-tri`).
A named adapter then holds one adapter of the same config per family (an `AdapterGroup`: one CP
tensor per family for LoRTA), and is added, activated, merged, saved and loaded as one. A fused
Linear (q/k/v in one) gets one hook, which places each matrix's Δy with `AttentionLayout.fuse`.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import PEFT_ATTR, build_adapter
from .config import LoRAConfig, LoRTAConfig
from .layouts import AttentionLayout, detect_layout, layouts_differences, prepare_model
from .mixed import MixedAdapters

AnyConfig = Union[LoRTAConfig, LoRAConfig]
# what `layout=` accepts: None (detect the one family), a family name, a layout, or several of these
LayoutSpec = Union[None, str, AttentionLayout, Sequence[Union[str, AttentionLayout]]]


class AdapterError(RuntimeError):
    pass


class AdapterGroup(nn.ModuleDict):
    """One named adapter over several layout families: one adapter of the same config per family.

    Keys are family names. Its tensors are saved under `<family>.<name>` (`esmfold-seq.lorta.A`).
    """

    def __init__(self, parts: Dict[str, nn.Module]):
        super().__init__(parts)
        first = next(iter(parts.values()))
        self.method, self.config, self.targets = first.method, first.config, first.targets

    def saved_tensors(self) -> Dict[str, torch.Tensor]:
        return {f"{family}.{k}": v for family, part in self.items() for k, v in part.saved_tensors().items()}

    def clear_cache(self) -> None:
        for part in self.values():
            part.clear_cache()


class _Slot(NamedTuple):
    """What one hooked Linear holds: matrices of one layer of one family."""
    layout: AttentionLayout
    layer: int
    matrices: Tuple[str, ...]


class AdapterSet(nn.Module):
    """The named adapters of one model, the hooks that apply the active one, and merge state."""

    def __init__(self, layouts: Sequence[AttentionLayout]):
        super().__init__()
        self.layouts: Tuple[AttentionLayout, ...] = tuple(layouts)
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.merged: Optional[str] = None
        self._enabled = True
        self._handles: List = []
        # module path -> the model's nn.Linear, and what it holds; plain dicts, not submodules (they
        # belong to the model), which deepcopy and pickle map consistently with the model's own copies
        self._linears: Dict[str, nn.Linear] = {}
        self._slots: Dict[str, _Slot] = {}
        self.mixed: Optional[MixedAdapters] = None  # the adapters mixed batches may use (`routed`)

    @property
    def layout(self) -> AttentionLayout:
        """The layout of a single-family set."""
        if len(self.layouts) != 1:
            raise AdapterError(f"this set spans {len(self.layouts)} layout families "
                               f"({', '.join(self.families)}); use .layouts")
        return self.layouts[0]

    @property
    def families(self) -> Tuple[str, ...]:
        return tuple(l.family for l in self.layouts)

    def bind(self, model: nn.Module) -> None:
        for layout in self.layouts:
            for layer in range(layout.n_layers):
                for relative, matrices in layout.groups():
                    path = layout.linear_path(layer, relative)
                    if path in self._slots:
                        raise AdapterError(f"{path} belongs to two layouts ({self._slots[path].layout.family}, "
                                           f"{layout.family})")
                    self._linears[path] = model.get_submodule(path)
                    self._slots[path] = _Slot(layout, layer, matrices)

    # --- hooks --------------------------------------------------------------------------------------

    def _hook(self, path: str, module, args, output):
        if not self._enabled:
            return None
        slot = self._slots[path]
        if self.mixed is not None and self.mixed.ids is not None:
            return self.mixed.output(slot.layout, slot.layer, slot.matrices, args[0], output, path)
        if self.active is None:
            return None
        adapter = self.part(self.active, slot.layout.family)
        # q, k, v of a fused Linear are computed in this order, so LoRTA's x·A is shared among them
        pieces = {m: adapter.delta(args[0], slot.layer, m) for m in slot.matrices if m in adapter.targets}
        if not pieces:
            return None
        return output + slot.layout.fuse(slot.matrices, pieces, dim=-1).to(output.dtype)

    def _install_hooks(self) -> None:
        if self._handles:
            return
        for path, lin in self._linears.items():
            self._handles.append(lin.register_forward_hook(partial(self._hook, path)))

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
        parts = {l.family: build_adapter(config, l, device=device) for l in self.layouts}
        adapter = next(iter(parts.values())) if len(parts) == 1 else AdapterGroup(parts)
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
        """The named (default: active) adapter: the method's module, or an AdapterGroup over families."""
        name = name or self.active
        if name is None or name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; have: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def part(self, name: Optional[str], family: str) -> nn.Module:
        """The named adapter's module for one layout family."""
        adapter = self.get(name)
        return adapter[family] if isinstance(adapter, AdapterGroup) else adapter

    def describe(self) -> Dict[str, str]:
        return {n: a.method for n, a in self.adapters.items()}

    # --- mixed batches (adapters/mixed.py) --------------------------------------------------------------

    def mix(self, name: str, adapter: Optional[nn.Module] = None) -> int:
        """Make an adapter usable in mixed batches (default: this set's adapter `name`); its slot id.

        The factors are copied: an adapter given here need not stay in the set (a library keeps only
        the stacked copies resident)."""
        if self.mixed is None:
            self.mixed = MixedAdapters(self.layouts)
        return self.mixed.put(name, self.get(name) if adapter is None else adapter)

    def unmix(self, name: str) -> None:
        if self.mixed is not None and name in self.mixed.names:
            self.mixed.remove(name)

    @contextlib.contextmanager
    def routed(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        """Run a batch whose sample b uses the mixed adapter `names[b]` (None: the base model alone)."""
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is merged: a mixed batch needs the base weights (unmerge)")
        if self.mixed is None:
            raise AdapterError("no adapter was made available to mixed batches (AdapterSet.mix)")
        device = next(iter(self._linears.values())).weight.device
        self.mixed.ids, self.mixed._u = self.mixed.slot_ids(names, device), None
        self.mixed.uniform = len(set(names)) == 1
        try:
            yield
        finally:
            self.mixed.ids, self.mixed._u, self.mixed.uniform = None, None, False

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

    def _layout_of(self, family: Optional[str]) -> AttentionLayout:
        if family is None:
            return self.layout
        for layout in self.layouts:
            if layout.family == family:
                return layout
        raise AdapterError(f"no layout family {family!r} in this set; have: {', '.join(self.families)}")

    def delta_weight(self, layer: int, matrix: str, name: Optional[str] = None,
                     family: Optional[str] = None) -> torch.Tensor:
        """Dense ΔW of one logical matrix (zero when not targeted); `family` for multi-family sets."""
        layout = self._layout_of(family)
        adapter = self.part(name, layout.family)
        if matrix not in adapter.targets:
            return torch.zeros(*layout.linear_shape(matrix))
        return adapter.delta_weight(layer, matrix)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        """W ← W ± ΔW for every hooked Linear, in float64, ΔW placed in fused rows as the hooks place Δy."""
        for path, slot in self._slots.items():
            adapter = self.part(self.active, slot.layout.family)
            pieces = {m: adapter.delta_weight(slot.layer, m).double() for m in slot.matrices if m in adapter.targets}
            if not pieces:
                continue
            lin = self._linears[path]
            dw = slot.layout.fuse(slot.matrices, pieces, dim=0).to(lin.weight.device)
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


def find_adapter_set(model: nn.Module) -> Optional[AdapterSet]:
    """The AdapterSet `model` itself carries (empty or not), or None."""
    found = getattr(model, PEFT_ATTR, None)
    return found if isinstance(found, AdapterSet) else None


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` itself (not a submodule) carries at least one adapter."""
    aset = find_adapter_set(model)
    return aset is not None and len(aset.adapters) > 0


def resolve_layouts(model: nn.Module, spec: LayoutSpec) -> Tuple[AttentionLayout, ...]:
    """The model's layouts for a `layout=` argument, each with module paths, one per family."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    layouts = []
    for item in items:
        if isinstance(item, AttentionLayout) and item.layer_paths:
            layouts.append(item)
            continue
        detected = detect_layout(model, family=item.family if isinstance(item, AttentionLayout) else item)
        if isinstance(item, AttentionLayout) and item.differences(detected):
            raise AdapterError("the given layout does not match the model: " + "; ".join(item.differences(detected)))
        layouts.append(detected)
    families = [l.family for l in layouts]
    if len(set(families)) != len(families):
        raise AdapterError(f"a layout family is named twice: {', '.join(families)}")
    return tuple(layouts)


def attach(model: nn.Module, layout: LayoutSpec = None) -> AdapterSet:
    """The model's AdapterSet, created (with layout detection and hooks) on first use."""
    existing = find_adapter_set(model)
    if existing is not None:
        if layout is not None:
            diffs = layouts_differences(resolve_layouts(model, layout), existing.layouts)
            if diffs:
                raise AdapterError("model already has adapters with another layout: " + "; ".join(diffs))
        return existing
    if getattr(model, PEFT_ATTR, None) is not None:
        raise AdapterError(f"model already has an attribute {PEFT_ATTR!r} that is not an AdapterSet")
    layouts = resolve_layouts(model, layout)
    for l in layouts:
        prepare_model(model, l)
    aset = AdapterSet(layouts)
    aset.bind(model)
    model.add_module(PEFT_ATTR, aset)
    aset._install_hooks()
    return aset


def get_adapter_set(model: nn.Module) -> AdapterSet:
    aset = find_adapter_set(model)
    if aset is None:
        raise AdapterError(f"{type(model).__name__} has no adapters (use add_adapter first)")
    return aset


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's."""
    aset = find_adapter_set(model)
    adapter_params = {id(p) for p in aset.parameters()} if aset is not None else set()
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)


def add_adapter(model: nn.Module, config: AnyConfig, name: str = "default",
                layout: LayoutSpec = None, freeze: bool = True) -> nn.Module:
    """Add a named adapter (LoRTA or LoRA) to `model` and return it.

    `layout` picks the attention family (detected when the model has exactly one), e.g.
    `layout=("esmfold-seq", "esmfold-tri")` adapts both attention families of an ESMFold trunk with
    one adapter (an `AdapterGroup`, one tensor per family). With `freeze=True` the base weights are
    frozen and exactly the adapters stay trainable; the caller may unfreeze more afterwards (e.g. a
    classifier head). The model's outputs are unchanged until the adapter is trained (its update is
    zero at initialisation).
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
