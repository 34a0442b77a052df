"""LoRA baseline on the same layouts and targets: ΔW = (alpha/r)·B A per targeted matrix.

A (r×in) is kaiming-uniform as in LoRA and PEFT, B (out×r) starts at zero. Stored as
`lora.{layer}.{matrix}.A` and `lora.{layer}.{matrix}.B`; 2·d·r parameters per square matrix.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .config import LoRAConfig, cast_input
from .layouts import AttentionLayout


class LoRA(nn.Module):
    method = "lora"

    def __init__(self, config: LoRAConfig, layout: AttentionLayout, device=None):
        super().__init__()
        self.config, self.layout = config, layout
        self.targets = config.targets
        kw = dict(device=device, dtype=config.torch_dtype)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer in range(layout.n_layers):
            for m in self.targets:
                out_f, in_f = layout.linear_shape(m)
                self.A[self._key(layer, m)] = nn.Parameter(torch.empty(config.rank, in_f, **kw))
                self.B[self._key(layer, m)] = nn.Parameter(torch.zeros(out_f, config.rank, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @staticmethod
    def _key(layer: int, matrix: str) -> str:
        return f"{layer}_{matrix}"

    def reset_parameters(self) -> None:
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.B.values():
            nn.init.zeros_(b)

    def delta(self, x: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        key = self._key(layer, matrix)
        A = self.A[key]
        # scale the thin N×r product: scaling B would keep an r×out copy of it per projection for backward
        return ((self.dropout(cast_input(x, A.dtype)) @ A.T) * self.config.scale) @ self.B[key].T

    def delta_weight(self, layer: int, matrix: str) -> torch.Tensor:
        key = self._key(layer, matrix)
        return (self.B[key] @ self.A[key]) * self.config.scale

    def clear_cache(self) -> None:
        pass

    @staticmethod
    def formula_num_parameters(config: LoRAConfig, layout: AttentionLayout) -> int:
        per_layer = sum(config.rank * sum(layout.linear_shape(m)) for m in config.targets)
        return layout.n_layers * per_layer

    def saved_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for key in self.A:
            layer, m = key.split("_")
            out[f"lora.{layer}.{m}.A"] = self.A[key]
            out[f"lora.{layer}.{m}.B"] = self.B[key]
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, alpha={c.alpha}, targets={','.join(c.targets)}"
