"""ESM-2 self-attention through torch's fused `scaled_dot_product_attention`: no L×L tensors kept.

fair-esm's `MultiheadAttention.forward` builds the attention scores and probabilities as explicit
(batch·heads)×L×L tensors and autograd keeps them for backward: at L = 2048 with 20 heads that is
320 MiB per tensor per layer in float32, and it grows with L². `sdpa_forward` computes the same
function with `torch.nn.functional.scaled_dot_product_attention`, whose fused kernels (flash /
memory-efficient on CUDA, flash on CPU) never hold the L×L probabilities.

    from esmfold_peft.fold.model.esm_attention import enable_sdpa, disable_sdpa
    enable_sdpa(esm2_model)     # every fair-esm MultiheadAttention in it, this instance only
    disable_sdpa(esm2_model)    # back to fair-esm's forward

What stays exactly as in fair-esm:
  * the q/k/v/out projections are the module's own `nn.Linear`s, called as modules in the same
    order (q, k, v, then out) with the same inputs, so the adapters' forward hooks fire and merged
    weights are read (esmfold_peft/adapters/inject.py); the parameter names and state dict do not
    change;
  * rotary embeddings (the module's own `rot_emb`), the 1/√d_head scaling (given to SDPA as `scale`;
    q is not pre-scaled, so it is applied once), attention dropout, and the key-padding mask: fair-esm
    fills padded keys with −inf before the softmax, SDPA gets a boolean mask over the keys (True =
    attend). Only keys are masked, so every query row keeps its sequence's non-padding keys (ESM-2
    inputs always hold the BOS token). A sequence made only of padding tokens has no key at all: fair-esm
    gives NaN there (its softmax over −inf only; ESM2's token-dropout rescaling already divides by its
    zero length), SDPA gives zeros for such rows; it is not a valid input either way.

Where it runs fair-esm's own forward instead (the class method, called unchanged): whenever the
per-head attention weights are asked for (`need_head_weights=True`, which ESM2 passes for
`need_head_weights=True` and `return_contacts=True`), `before_softmax`, an `attn_mask`, incremental
decoding state or `static_kv`, `bias_k`/`bias_v`, `add_zero_attn`, encoder–decoder attention, or ONNX
tracing. ESM2's layers always pass `need_weights=True` and ESM2 throws the head-averaged weights
away unless it asked for per-head ones; under SDPA those averaged weights are not computed and the
second return value is None (call `disable_sdpa` for a caller that reads them).

Why this is the project's own forward and not a patch in compat.py: compat.py holds workarounds
for bugs in our dependencies. fair-esm's attention is correct; this is a feature of ours, a
different algorithm for the same function, opt-in per model instance (`model.lm.sdpa`), tested to
give the same outputs and gradients as the original (tests/test_esm_attention.py). Binding it on
instances rather than replacing `MultiheadAttention.forward` leaves every other fair-esm model in
the process (a reference model in a test, ESMFold's own parts) on fair-esm's code.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _unsupported(attn: nn.Module, key, value, incremental_state, static_kv, attn_mask, before_softmax,
                 need_head_weights) -> bool:
    """True where the call needs something that only fair-esm's own forward provides."""
    return (need_head_weights or before_softmax or attn_mask is not None or incremental_state is not None
            or static_kv or key is None or value is None or attn.bias_k is not None or attn.add_zero_attn
            or attn.encoder_decoder_attention or attn.onnx_trace)


def sdpa_forward(self, query: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
                 key_padding_mask: Optional[torch.Tensor] = None, incremental_state=None, need_weights: bool = True,
                 static_kv: bool = False, attn_mask: Optional[torch.Tensor] = None, before_softmax: bool = False,
                 need_head_weights: bool = False):
    """fair-esm `MultiheadAttention.forward` (same signature, inputs T×B×C) through SDPA.

    Returns (attn T×B×C, None); falls back to the class's forward where weights or unsupported
    options are asked for (module docstring).
    """
    if _unsupported(self, key, value, incremental_state, static_kv, attn_mask, before_softmax, need_head_weights):
        return type(self).forward(self, query, key, value, key_padding_mask=key_padding_mask,
                                  incremental_state=incremental_state, need_weights=need_weights,
                                  static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax,
                                  need_head_weights=need_head_weights)
    tgt_len, bsz, embed_dim = query.shape
    heads, head_dim = self.num_heads, self.head_dim
    # as fair-esm: the same input object to q, k and v in self-attention (LoRTA shares x·A on it)
    q = self.q_proj(query)
    k = self.k_proj(query if self.self_attention else key)
    v = self.v_proj(query if self.self_attention else value)
    # (L, B, H·d) -> (B·H, L, d), fair-esm's layout, in which its rotary module works
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.reshape(-1, bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(-1, bsz * heads, head_dim).transpose(0, 1)
    if self.rot_emb is not None:
        q, k = self.rot_emb(q, k)
    src_len = k.shape[1]
    # the rotary tables are float32 unless the model was cast: SDPA wants one dtype (autocast: v's)
    q = q.to(v.dtype).view(bsz, heads, tgt_len, head_dim)
    k = k.to(v.dtype).view(bsz, heads, src_len, head_dim)
    v = v.view(bsz, heads, src_len, head_dim)
    mask = None
    if key_padding_mask is not None and key_padding_mask.dim() > 0:  # a 0-dim mask means none (fair-esm)
        mask = ~key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                         scale=self.scaling)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (B, H, L, d) -> (L, B, H·d)
    return self.out_proj(out), None


def _attention_modules(model: nn.Module):
    from esm.multihead_attention import MultiheadAttention

    return [m for m in model.modules() if isinstance(m, MultiheadAttention)]


def _is_sdpa(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return isinstance(f, partial) and f.func is sdpa_forward


def enable_sdpa(model: nn.Module) -> int:
    """Run every fair-esm `MultiheadAttention` inside `model` through `sdpa_forward`; returns how many.

    The forward is bound on each instance (a `functools.partial`, so `copy.deepcopy` and pickling
    bind it to the copy); the class and every other model keep fair-esm's forward.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} contains no fair-esm MultiheadAttention")
    for m in modules:
        m.forward = partial(sdpa_forward, m)
    return len(modules)


def disable_sdpa(model: nn.Module) -> int:
    """Undo `enable_sdpa`: the attention modules of `model` use fair-esm's forward again; returns how many."""
    n = 0
    for m in _attention_modules(model):
        if _is_sdpa(m):
            del m.__dict__["forward"]
            n += 1
    return n


def sdpa_enabled(model: nn.Module) -> bool:
    """Whether every fair-esm attention module of `model` runs through `sdpa_forward`."""
    modules = _attention_modules(model)
    return bool(modules) and all(_is_sdpa(m) for m in modules)
