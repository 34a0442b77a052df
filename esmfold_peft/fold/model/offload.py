"""The language model's layers kept on the CPU while the rest predicts on a GPU (`predict.py --cpu-offload`).

ESM-2 3B is 11 GiB of float32 weights, most of ESMFold's; esm-fold's `--cpu-offload` keeps it in host
memory. Here each transformer layer's weights stay in (pinned) CPU memory, and a layer gets device
copies just before its own forward and drops them right after, so at most one layer's weights are on
the device at a time. The weights are frozen at prediction, so nothing is copied back. Adapters stay
on the device and apply unmerged (merging would write into the CPU weights). The cost is one
host-to-device copy of the LM's weights per forward (per recycle-free prediction batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn


@dataclass
class LayerOffload:
    """The hooks of an offloaded language model (`remove()` puts every layer back on the device)."""

    device: torch.device
    layers: List[nn.Module]
    handles: list = field(default_factory=list)
    loads: int = 0  # layer forwards that copied weights to the device (tests and logs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.layers:
            layer.to(self.device)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in list(layer.parameters()) + list(layer.buffers()))


def _tensors(layer: nn.Module):
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None:
                yield module, name, p
        for name, b in module._buffers.items():
            if b is not None:
                yield module, name, b


def offload_layers(layers: List[nn.Module], device: torch.device) -> LayerOffload:
    """Keep `layers` on the CPU (pinned when `device` is CUDA); each is copied to `device` for its forward."""
    device = torch.device(device)
    state = LayerOffload(device, list(layers))
    pin = device.type == "cuda"
    for layer in state.layers:
        if any(p.requires_grad for p in layer.parameters()):
            raise ValueError("offloading is for prediction: the layer has trainable weights")
        host = {}
        for module, name, t in _tensors(layer):
            cpu = t.detach().to("cpu")
            host[(id(module), name)] = cpu.pin_memory() if pin else cpu
            t.data = host[(id(module), name)]

        def load(mod, args, host=host, layer=layer):
            for module, name, t in _tensors(layer):
                t.data = host[(id(module), name)].to(device, non_blocking=True)
            state.loads += 1

        def drop(mod, args, output, host=host, layer=layer):
            for module, name, t in _tensors(layer):
                t.data = host[(id(module), name)]

        state.handles += [layer.register_forward_pre_hook(load), layer.register_forward_hook(drop)]
    return state


def offload_language_model(model: nn.Module, device: torch.device) -> LayerOffload:
    """Offload the folding model's ESM-2 transformer layers (`model.esm.layers`); the rest stays on `device`."""
    return offload_layers(list(model.esm.layers), device)
