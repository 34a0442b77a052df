"""Mixed-adapter batches: every sample of a batch runs with its own adapter over one frozen model.

A `MixedAdapters` holds K adapters of one `AdapterSet` stacked per factor, slot 0 being "no adapter"
(all zeros). Inside `AdapterSet.routed(names)` each sample b carries a slot id a(b), and every hooked
projection adds, for LoRTA (layer l, matrix m; the efficient path, no dense ΔW):

    q/k/v:  u_b = x_b A[a(b)]                 (one batched matmul for the batch, shared by q, k and v)
            w_b[h] = C_H[a(b),h] ∘ C_L[a(b),l] ∘ C_M[a(b),m]       (the scale s_a folded into C_M)
            Δy_b = u_b K_bᵀ,  K_b[h·d_H + j, k] = B[a(b),j,k] w_b[h,k]
    o:      Δy_b = (x_b K_b) A[a(b)]ᵀ

and for LoRA Δy_b = (x_b A[a(b),l,m]ᵀ) (s_a B[a(b),l,m])ᵀ, gathered the same way (Punica's BGMV).
Ranks are padded to the largest with zero columns and missing targets are zero rows of C_M (LoRA:
zero matrices): zeros add exactly nothing, so a sample's output is its solo output up to the
reassociation of float sums. The cost per sample does not grow with K; only the resident stacks do.

Which axis of a projection's input is the batch: fair-esm's attention is time-first (T, B, d), every
other known family batch-first (B, …, d); the extra axes (tokens, pair rows) are flattened. A call
whose batch axis does not have the batch's size (openfold's chunked triangle attention flattens its
batch) is refused, unless every sample of the batch uses the same adapter: route such models
unchunked, or split the batch by adapter (`groups_by_adapter`: PEFT's way, one forward per adapter).

Only LoRTA over all three modes (the paper's one tensor, the default) and LoRA stack; the mode
ablations hold per-layer or per-matrix tensors and are refused by name.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .layouts import MATRICES, AttentionLayout

FULL_MODES = {"heads", "matrices", "layers"}
TIME_FIRST = {"fair-esm"}  # families whose projections see (tokens, batch, features)


class MixedAdapterError(ValueError):
    """An adapter that cannot join a mixed batch, or a call that cannot be routed."""


def sample_axis(family: str) -> int:
    return 1 if family in TIME_FIRST else 0


class _Stack:
    """One layout family's factors of every resident adapter, stacked on a leading slot axis (slot 0 = none).

    The stacked tensors are the only copy kept: an adapter's factors are written into its slot (ranks padded
    with zero columns to the largest), and the tensors grow (doubling their slots, or widening the rank)
    when needed. One method per stack: LoRTA and LoRA factors have different shapes."""

    def __init__(self, layout: AttentionLayout):
        self.layout = layout
        self.method: Optional[str] = None
        self.tensors: Dict[str, torch.Tensor] = {}  # factor name -> (slots, …, rank)
        self.ranks: List[int] = [0]  # each slot's own rank (0: empty)
        self.reserve = 0  # slots to allocate at once when known (`MixedAdapters.reserve`), instead of doubling

    def put(self, slot: int, adapter: nn.Module) -> None:
        if any(self.ranks) and adapter.method != self.method:
            raise MixedAdapterError(f"{self.layout.family}: LoRTA and LoRA adapters cannot share one mixed batch "
                                    f"(this model's mixed adapters are {self.method}; route them in separate jobs)")
        factors = _lorta_factors(adapter) if adapter.method == "lorta" else _lora_factors(adapter, self.layout)
        if not any(self.ranks):
            self.tensors, self.method = {}, adapter.method
        rank = adapter.config.rank
        self._grow(slot + 1, rank, factors)
        for key, value in factors.items():
            target = self.tensors[key]
            target[slot].zero_()
            target[slot, ..., :rank] = value.to(device=target.device, dtype=target.dtype)
        self.ranks += [0] * (slot + 1 - len(self.ranks))
        self.ranks[slot] = rank

    def _grow(self, slots: int, rank: int, like: Dict[str, torch.Tensor]) -> None:
        ref = next(iter(self.tensors.values()), None)
        have, width = (0, 0) if ref is None else (ref.shape[0], ref.shape[-1])
        if slots <= have and rank <= width:
            return
        grow = max(self.reserve, 2 * have) if slots > have else have
        count, width = max(slots, grow, 2), max(width, rank)
        for key, value in like.items():
            old = self.tensors.get(key)
            grown = torch.zeros(count, *value.shape[:-1], width, dtype=value.dtype,
                                device=value.device if old is None else old.device)
            if old is not None:
                grown[:old.shape[0], ..., :old.shape[-1]] = old
            self.tensors[key] = grown

    def clear(self, slot: int) -> None:
        for t in self.tensors.values():
            t[slot].zero_()
        self.ranks[slot] = 0

    def stacked(self, device) -> Dict[str, torch.Tensor]:
        """name -> (slots, …, rank) tensor on `device` (moved there once, and kept there)."""
        if not any(self.ranks):
            raise MixedAdapterError("no adapter is resident")
        if next(iter(self.tensors.values())).device != torch.device(device):
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self.tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _lorta_factors(adapter) -> Dict[str, torch.Tensor]:
    config = adapter.config
    if set(config.modes) != FULL_MODES:
        raise MixedAdapterError(f"a LoRTA adapter over modes {','.join(config.modes)} holds one tensor per layer or "
                                "matrix; mixed batches take the full tensor (modes heads,matrices,layers)")
    C_M = torch.zeros(len(MATRICES), config.rank, dtype=adapter.C_M.dtype, device=adapter.C_M.device)
    for i, m in enumerate(adapter.targets):
        C_M[MATRICES.index(m)] = adapter.C_M.detach()[i] * config.scale
    return {"A": adapter.A.detach(), "B": adapter.B.detach(), "C_H": adapter.C_H.detach(),
            "C_L": adapter.C_L.detach(), "C_M": C_M}  # written into the stack (copied) by `_Stack.put`


def _lora_factors(adapter, layout: AttentionLayout) -> Dict[str, torch.Tensor]:
    """Per (layer, matrix): A (in × r) and the scaled B (out × r), rank last as the stack pads it."""
    out = {}
    for layer in range(layout.n_layers):
        for m in MATRICES:
            out_f, in_f = layout.linear_shape(m)
            key = adapter._key(layer, m)
            if m in adapter.targets:
                out[f"{layer}.{m}.A"] = adapter.A[key].detach().T  # in × r
                out[f"{layer}.{m}.B"] = adapter.B[key].detach() * adapter.config.scale  # out × r
            else:
                kw = dict(dtype=adapter.config.torch_dtype, device=next(adapter.parameters()).device)
                out[f"{layer}.{m}.A"] = torch.zeros(in_f, adapter.config.rank, **kw)
                out[f"{layer}.{m}.B"] = torch.zeros(out_f, adapter.config.rank, **kw)
    return out


class MixedAdapters:
    """The adapters of one AdapterSet that mixed batches may use, by name, in slots 1..K."""

    def __init__(self, layouts):
        self.stacks = {layout.family: _Stack(layout) for layout in layouts}
        self.names: Dict[str, int] = {}
        self.ids: Optional[torch.Tensor] = None  # per sample, set while routed
        self.uniform = False  # all samples of the routed batch use one adapter (chunked inputs are then fine)
        self._u = None  # (layer, weakref to x, version, u): q, k and v of a layer share x A

    def reserve(self, adapters: int) -> None:
        """Allocate room for `adapters` at the next growth (a library that knows its size wastes no slots)."""
        for stack in self.stacks.values():
            stack.reserve = adapters + 1  # slot 0 is the base

    def put(self, name: str, adapter: nn.Module) -> int:
        """Copy `adapter`'s factors (an adapter module, or an AdapterGroup over families) into a slot."""
        parts = dict(adapter.items()) if isinstance(adapter, nn.ModuleDict) else \
            {next(iter(self.stacks)): adapter}
        if set(parts) != set(self.stacks):
            raise MixedAdapterError(f"adapter {name!r} covers {', '.join(parts)}, the model "
                                    f"{', '.join(self.stacks)}")
        slot = self.names.get(name) or self._free_slot()
        for family, part in parts.items():
            self.stacks[family].put(slot, part)
        self.names[name] = slot
        return slot

    def _free_slot(self) -> int:
        used = set(self.names.values())
        return next(i for i in range(1, len(used) + 2) if i not in used)

    def remove(self, name: str) -> None:
        slot = self.names.pop(name)
        for stack in self.stacks.values():
            stack.clear(slot)

    def slot_ids(self, names: Sequence[Optional[str]], device) -> torch.Tensor:
        unknown = sorted({n for n in names if n is not None and n not in self.names})
        if unknown:
            raise MixedAdapterError(f"no resident adapter named {', '.join(map(repr, unknown))}; have: "
                                    f"{', '.join(self.names) or 'none'}")
        return torch.tensor([0 if n is None else self.names[n] for n in names], dtype=torch.long, device=device)

    def resident_bytes(self) -> int:
        """Bytes of the stacked factors (every allocated slot: up to twice the adapters held, as stacks grow)."""
        return sum(stack.nbytes() for stack in self.stacks.values())

    # --- the routed forward -----------------------------------------------------------------------------

    def output(self, layout: AttentionLayout, layer: int, matrices, x: torch.Tensor, output: torch.Tensor,
               path: str) -> torch.Tensor:
        """`output` + each sample's own Δy for the Linear holding `matrices` (module docstring)."""
        ids = self.ids
        axis = sample_axis(layout.family)
        n = ids.numel()
        if (x.dim() < 2 or x.shape[axis] != n) and self.uniform:  # one adapter for all: no batch axis needed
            ids, axis, n, x = ids[:1], 0, 1, x.unsqueeze(0)
            return self.output_for(layout, layer, matrices, x, output.unsqueeze(0), ids, axis).squeeze(0)
        if x.dim() < 2 or x.shape[axis] != n:
            raise MixedAdapterError(f"{path}: input of shape {tuple(x.shape)} has no batch axis of the batch's "
                                    f"{n} samples (axis {axis}); a chunked forward flattens it: run unchunked or "
                                    "split the batch by adapter")
        return self.output_for(layout, layer, matrices, x, output, ids, axis)

    def output_for(self, layout, layer, matrices, x, output, ids, axis) -> torch.Tensor:
        n = ids.numel()
        stack = self.stacks[layout.family]
        delta = _lorta_delta if stack.method == "lorta" else _lora_delta  # one method per stack (`_Stack.put`)
        factors = stack.stacked(x.device)
        moved = x.movedim(axis, 0)
        flat = moved.reshape(n, -1, moved.shape[-1]).to(next(iter(factors.values())).dtype)
        pieces = {m: delta(self, factors, x, flat, ids, layout, layer, m) for m in matrices}
        fused = layout.fuse(matrices, pieces, dim=-1)
        return output + fused.reshape(*moved.shape[:-1], fused.shape[-1]).movedim(0, axis).to(output.dtype)

    def shared_u(self, x: torch.Tensor, flat: torch.Tensor, A: torch.Tensor, layer: int) -> torch.Tensor:
        """u = x A per sample, once for q, k and v of a layer (they are called with the same input `x`)."""
        cached = self._u
        if cached is not None and cached[0] == layer and cached[1]() is x and cached[2] == x._version:
            return cached[3]
        u = torch.bmm(flat, A)
        self._u = (layer, weakref.ref(x), x._version, u)
        return u


def groups_by_adapter(names: Sequence[Optional[str]]) -> Dict[Optional[str], List[int]]:
    """The sample indices of each distinct adapter, in first-appearance order: the split-by-adapter fallback
    runs one forward per group (each routed with a single adapter) and puts the outputs back in place."""
    groups: Dict[Optional[str], List[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups


def _head_factor_t(factors, ids, layout: AttentionLayout, layer: int, matrix: str) -> torch.Tensor:
    """K_bᵀ per sample: (n, r, heads·d_H)."""
    w = factors["C_H"][ids] * factors["C_L"][ids, layer][:, None, :] * \
        factors["C_M"][ids, MATRICES.index(matrix)][:, None, :]  # n × H × r
    heads = layout.heads_of(matrix)
    if heads != layout.n_heads:  # grouped-query attention, as LoRTA.head_weights
        w = w.reshape(w.shape[0], heads, layout.n_heads // heads, -1).mean(2)
    Bt = factors["B"][ids].transpose(1, 2)  # n × r × d_H
    return (w.transpose(1, 2)[..., None] * Bt[:, :, None, :]).reshape(w.shape[0], w.shape[2], -1)


def _lorta_delta(mixed: MixedAdapters, factors, x, flat, ids, layout, layer: int, matrix: str) -> torch.Tensor:
    A = factors["A"][ids]  # n × d × r
    Kt = _head_factor_t(factors, ids, layout, layer, matrix)
    if matrix == "o":
        return torch.bmm(torch.bmm(flat, Kt.transpose(1, 2)), A.transpose(1, 2))
    return torch.bmm(mixed.shared_u(x, flat, A, layer), Kt)


def _lora_delta(mixed: MixedAdapters, factors, x, flat, ids, layout, layer: int, matrix: str) -> torch.Tensor:
    A = factors[f"{layer}.{matrix}.A"][ids]  # n × in × r
    B = factors[f"{layer}.{matrix}.B"][ids]  # n × out × r
    return torch.bmm(torch.bmm(flat, A), B.transpose(1, 2))

