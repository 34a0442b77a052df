"""LoRTA: every attention update of a model's attention family as slices of one CP tensor.

    T = [[A, B, C_H, C_L, C_M]],  A: d×r, B: d_H×r, C_H: H×r, C_L: L×r, C_M: M×r  (M = #targets)

q, k, v (heads split the output):  ΔW[h·d_H + j, i] = s Σ_k A[i,k] B[j,k] C_H[h,k] C_L[l,k] C_M[m,k]
o       (heads split the input):   ΔW[i, h·d_H + j] = s Σ_k A[i,k] B[j,k] C_H[h,k] C_L[l,k] C_M[m,k]

Efficient application (never a dense ΔW in training). With w[h] = s·C_H[h] ∘ C_L[l] ∘ C_M[m] and
K = (B ⊗ w) laid out as an (H·d_H)×r matrix, K[h·d_H + j, k] = B[j,k] w[h,k]:

    q/k/v:  u = x A (shared by q, k and v of a layer),  Δy = u Kᵀ      (= (u ∘ w[h]) Bᵀ per head)
    o:      Δy = (x K) Aᵀ                                              (= (Σ_h x_h B ∘ w[h]) Aᵀ)

K costs O(d·r) to form; each projection costs O(N·r·d), the order of LoRA, and q/k/v share x A.
Aᵀ and Kᵀ are formed as contiguous r×d matrices and every product reads them in that layout, so
the gradients of the d×r factors come out of autograd as (r×N)(N×d) products: on CPU BLAS the
(d×N)(N×r) orientation that the d×r storage would otherwise select ran 4-6× slower at d = 2560
(bench/adapter_profile.py shows it; the stored shapes below are unchanged).

One tensor per layout family. The tensor is defined over one family's (d, d_H, H, L, M): an
adapter over several families (ESMFold's trunk: sequence attention d=1024, H=32, L=48 blocks;
triangle attention d=128, H=4, L=96 modules) holds one LoRTA per family (`inject.AdapterGroup`),
r·(d + d_H + H + L + M) parameters each. Sharing across families is not possible for A (the widths
differ) and would tie head and layer indices that mean different things (a sequence head and a
pair head; a block and a triangle module); the factors that could be shared (B when d_H agrees,
C_M) cost only r·(d_H + M) each, so separate tensors keep each family exactly the paper's object
at no real cost. A fused q/k/v Linear changes nothing here: this module always sees the logical
q, k, v matrices; `AttentionLayout.fuse` places their rows.

Grouped-query attention: k and v have H_kv < H heads; key/value head g serves the query heads
g·G … g·G+G−1 (G = H/H_kv, Hugging Face's `repeat_kv` order), so its head factor is the mean of
their rows of C_H. The tensor keeps r·(d + d_H + H + L + M) parameters.

Mode ablation (paper Table 2): a mode that is not tensorised becomes a leading batch axis of the
factors (one tensor per layer and/or matrix). Stored shapes, with M = number of targets:

| modes | A | B | C_H | C_L | C_M |
|---|---|---|---|---|---|
| heads, matrices, layers | d×r | d_H×r | H×r | L×r | M×r |
| heads, matrices | L×d×r | L×d_H×r | L×H×r | — | L×M×r |
| heads, layers | M×d×r | M×d_H×r | M×H×r | M×L×r | — |
| heads | L×M×d×r | L×M×d_H×r | L×M×H×r | — | — |

Initialisation: B = 0 (the update is exactly zero at step 0, as LoRA's B); A, C_H, C_L, C_M are
uniform in ±1/√r, the scale of the authors' code (kaiming-uniform over the rank axis), so every
factor has a nonzero gradient from the second optimizer step on.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, Tuple

import torch
from torch import nn

from .config import LoRTAConfig, cast_input
from .layouts import AttentionLayout


class LoRTA(nn.Module):
    method = "lorta"

    def __init__(self, config: LoRTAConfig, layout: AttentionLayout, device=None):
        super().__init__()
        self.config, self.layout = config, layout
        self.targets = config.targets
        self._mi = {m: i for i, m in enumerate(self.targets)}
        L, M, r = layout.n_layers, len(self.targets), config.rank
        share_layers, share_matrices = "layers" in config.modes, "matrices" in config.modes
        lead = (() if share_layers else (L,)) + (() if share_matrices else (M,))
        self._lead_layers, self._lead_matrices = not share_layers, not share_matrices
        kw = dict(device=device, dtype=config.torch_dtype)
        self.A = nn.Parameter(torch.empty(*lead, layout.d_model, r, **kw))
        self.B = nn.Parameter(torch.zeros(*lead, layout.head_dim, r, **kw))
        self.C_H = nn.Parameter(torch.empty(*lead, layout.n_heads, r, **kw))
        self.C_L = nn.Parameter(torch.empty(*((M,) if not share_matrices else ()), L, r, **kw)) if share_layers else None
        self.C_M = nn.Parameter(torch.empty(*((L,) if not share_layers else ()), M, r, **kw)) if share_matrices else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._slots: Dict[int, tuple] = {}
        self._last_qkv = [m for m in self.targets if m != "o"][-1] if set(self.targets) - {"o"} else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.config.rank)
        with torch.no_grad():
            for p in (self.A, self.C_H, self.C_L, self.C_M):
                if p is not None:
                    p.uniform_(-bound, bound)
            self.B.zero_()

    # --- factors of one (layer, matrix) slice -----------------------------------------------------

    def _lead(self, layer: int, mi: int) -> Tuple[int, ...]:
        return ((layer,) if self._lead_layers else ()) + ((mi,) if self._lead_matrices else ())

    def head_weights(self, layer: int, matrix: str) -> torch.Tensor:
        """w[h, :] = s · C_H[h] ∘ C_L[l] ∘ C_M[m] for the heads of `matrix` (H×r, or H_kv×r for k/v)."""
        mi = self._mi[matrix]
        w = self.C_H[self._lead(layer, mi)] * self.config.scale
        if self.C_L is not None:
            w = w * self.C_L[(mi,) if self._lead_matrices else ()][layer]
        if self.C_M is not None:
            w = w * self.C_M[(layer,) if self._lead_layers else ()][mi]
        n = self.layout.heads_of(matrix)
        if n != self.layout.n_heads:  # grouped-query attention: key/value head = mean of its query heads
            w = w.reshape(n, self.layout.n_heads // n, -1).mean(1)
        return w

    def _head_factor_t(self, layer: int, matrix: str) -> torch.Tensor:
        """Kᵀ, contiguous r × (heads·d_H): Kᵀ[k, h·d_H + j] = B[j,k] w[h,k]."""
        w = self.head_weights(layer, matrix)
        Bt = self.B[self._lead(layer, self._mi[matrix])].T
        return (w.T[:, :, None] * Bt[:, None, :]).reshape(Bt.shape[0], -1)

    def _model_factor_t(self, layer: int, matrix: str) -> torch.Tensor:
        """Aᵀ, contiguous r × d."""
        return self.A[self._lead(layer, self._mi[matrix])].T.contiguous()

    # --- application --------------------------------------------------------------------------------

    def _shared_input_projection(self, x: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        """u = dropout(x) A, computed once per layer and reused by q, k and v (same x, same A)."""
        if torch.compiler.is_compiling():
            At = self._model_factor_t(layer, matrix)
            return self.dropout(cast_input(x, At.dtype)) @ At.T
        a_key = self._lead(layer, self._mi[matrix])
        key = (a_key, self.A._version, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type),
               self.training)
        slot = self._slots.get(layer)
        if slot is not None:
            ref, version, skey, u = slot
            if ref() is x and x._version == version and skey == key:
                return u
        At = self._model_factor_t(layer, matrix)
        u = self.dropout(cast_input(x, At.dtype)) @ At.T
        self._slots[layer] = (weakref.ref(x), x._version, key, u)
        return u

    def delta(self, x: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        """Δy for input activations `x` (…×in) of projection `matrix` in `layer`."""
        if self.config.implementation == "dense":
            return self.dropout(cast_input(x, self.A.dtype)) @ self.delta_weight(layer, matrix).T
        Kt = self._head_factor_t(layer, matrix)
        if matrix == "o":
            At = self._model_factor_t(layer, matrix)
            return (self.dropout(cast_input(x, At.dtype)) @ Kt.T) @ At
        u = self._shared_input_projection(x, layer, matrix)
        if matrix == self._last_qkv:  # q, k, v are called in this order by every known family
            self._slots.pop(layer, None)
        return u @ Kt

    def clear_cache(self) -> None:
        self._slots.clear()

    # --- dense views (merge, inspection, tests) -----------------------------------------------------

    def delta_weight(self, layer: int, matrix: str) -> torch.Tensor:
        """Dense ΔW in nn.Linear orientation (out × in)."""
        A = self.A[self._lead(layer, self._mi[matrix])]
        Kt = self._head_factor_t(layer, matrix)
        return Kt.T @ A.T if matrix != "o" else A @ Kt

    # --- parameters ---------------------------------------------------------------------------------

    @staticmethod
    def formula_num_parameters(config: LoRTAConfig, layout: AttentionLayout) -> int:
        d, dh, H, L, M, r = (layout.d_model, layout.head_dim, layout.n_heads, layout.n_layers,
                             len(config.targets), config.rank)
        modes = set(config.modes)
        if modes == {"heads", "matrices", "layers"}:
            return r * (d + dh + H + L + M)
        if modes == {"heads", "matrices"}:
            return L * r * (d + dh + H + M)
        if modes == {"heads", "layers"}:
            return M * r * (d + dh + H + L)
        return L * M * r * (d + dh + H)

    def saved_tensors(self) -> Dict[str, torch.Tensor]:
        out = {"lorta.A": self.A, "lorta.B": self.B, "lorta.C_H": self.C_H}
        if self.C_L is not None:
            out["lorta.C_L"] = self.C_L
        if self.C_M is not None:
            out["lorta.C_M"] = self.C_M
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, alpha={c.alpha}, targets={','.join(c.targets)}, modes={','.join(c.modes)}"
