"""Where a transformer keeps its attention projections, and how heads split them.

A layout is the only thing the adapter core knows about a model: for each layer, the module paths
of the q/k/v/o projections (all `nn.Linear`), the model width `d`, the number of query heads `H`,
of key/value heads `H_kv` (grouped-query attention when `H_kv < H`) and the head width `d_H`.

Head axis (SPEC §1): heads split the **output** features of q, k, v (out index = h·d_H + j) and
the **input** features of o (in index = h·d_H + j). `A` runs along the model dimension `d`.

Three families are known and detected from module names:

| family | projections (relative to a layer) | heads read from |
|---|---|---|
| `fair-esm` (ESM-2, ESM-1b) | `self_attn.{q,k,v,out}_proj` | `self_attn.num_heads`, `.head_dim` |
| `hf-bert` (BERT, RoBERTa, HF ESM) | `attention.self.{query,key,value}`, `attention.output.dense` | `attention.self.num_attention_heads` |
| `hf-llama` (Llama, Mistral, Qwen2, SmolLM…) | `self_attn.{q,k,v,o}_proj` | the attention's `config` (GQA aware) |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

MATRICES: Tuple[str, ...] = ("q", "k", "v", "o")


class LayoutError(ValueError):
    """The model's attention layout cannot be determined or does not match what was asked for."""


@dataclass(frozen=True)
class Family:
    name: str
    proj: Dict[str, str]  # matrix -> path relative to the layer
    attention: str  # path of the module that knows the head counts


FAMILIES: Dict[str, Family] = {
    "fair-esm": Family(
        "fair-esm",
        {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
        "self_attn",
    ),
    "hf-bert": Family(
        "hf-bert",
        {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense"},
        "attention.self",
    ),
    "hf-llama": Family(
        "hf-llama",
        {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
        "self_attn",
    ),
}


@dataclass(frozen=True)
class AttentionLayout:
    """Shape of a model's attention stack, plus (when built from a model) where each layer lives."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    n_kv_heads: Optional[int] = None  # None means n_heads (no grouped-query attention)
    layer_paths: Tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("n_layers", "d_model", "n_heads", "head_dim", "n_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise LayoutError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise LayoutError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.layer_paths and len(self.layer_paths) != self.n_layers:
            raise LayoutError(f"{len(self.layer_paths)} layer paths for n_layers={self.n_layers}")

    # shape of each projection as an nn.Linear (out_features, in_features)
    def linear_shape(self, matrix: str) -> Tuple[int, int]:
        qd, kvd = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": (qd, self.d_model), "k": (kvd, self.d_model), "v": (kvd, self.d_model),
                "o": (self.d_model, qd)}[matrix]

    def heads_of(self, matrix: str) -> int:
        return self.n_kv_heads if matrix in ("k", "v") else self.n_heads

    def projection_path(self, layer: int, matrix: str) -> str:
        if not self.layer_paths:
            raise LayoutError("this layout was built from a specification, not a model: it has no module paths")
        prefix = self.layer_paths[layer]
        rel = FAMILIES[self.family].proj[matrix]
        return f"{prefix}.{rel}" if prefix else rel

    def describe(self) -> dict:
        """The fields that must agree between a saved adapter and a model (paths excluded)."""
        return {"family": self.family, "n_layers": self.n_layers, "d_model": self.d_model,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}

    def differences(self, other: "AttentionLayout") -> List[str]:
        mine, theirs = self.describe(), other.describe()
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]

    def with_paths(self, layer_paths: Sequence[str]) -> "AttentionLayout":
        return dataclasses.replace(self, layer_paths=tuple(layer_paths))


# --- named architectures (shapes only, nothing downloaded) --------------------------------------

def _spec(family, L, d, H, kv=None, hd=None):
    return AttentionLayout(family, L, d, H, hd or d // H, kv)


ARCHITECTURES: Dict[str, AttentionLayout] = {
    "esm2_t6_8M": _spec("fair-esm", 6, 320, 20),
    "esm2_t12_35M": _spec("fair-esm", 12, 480, 20),
    "esm2_t30_150M": _spec("fair-esm", 30, 640, 20),
    "esm2_t33_650M": _spec("fair-esm", 33, 1280, 20),
    "esm2_t36_3B": _spec("fair-esm", 36, 2560, 40),
    "esm2_t48_15B": _spec("fair-esm", 48, 5120, 40),
    "bert-base": _spec("hf-bert", 12, 768, 12),
    "roberta-base": _spec("hf-bert", 12, 768, 12),
    "roberta-large": _spec("hf-bert", 24, 1024, 16),
    "all-minilm-l6-v2": _spec("hf-bert", 6, 384, 12),
    "llama2-7b": _spec("hf-llama", 32, 4096, 32),
    "llama2-13b": _spec("hf-llama", 40, 5120, 40),
    "llama3-8b": _spec("hf-llama", 32, 4096, 32, kv=8, hd=128),
    "smollm2-135m": _spec("hf-llama", 30, 576, 9, kv=3, hd=64),
}


def architecture(name: str) -> AttentionLayout:
    """Shapes of a named architecture (case-insensitive; fair-esm's `_UR50D` suffix is accepted)."""
    by_lower = {k.lower(): v for k, v in ARCHITECTURES.items()}
    key = name.lower().removesuffix("_ur50d")
    if key not in by_lower:
        raise LayoutError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return by_lower[key]


# --- detection from a model ---------------------------------------------------------------------

def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _layer_prefixes(model: nn.Module, family: Family) -> List[str]:
    """Layer prefixes under which all four projections of `family` exist as nn.Linear."""
    modules = dict(model.named_modules())
    prefixes = []
    for name, module in modules.items():
        if not _ends_with(name, family.proj["q"]):
            continue
        prefix = name[: len(name) - len(family.proj["q"])].rstrip(".")
        paths = [f"{prefix}.{p}" if prefix else p for p in family.proj.values()]
        if all(isinstance(modules.get(p), nn.Linear) for p in paths):
            prefixes.append(prefix)
    return prefixes


def _head_counts(model: nn.Module, family: Family, prefix: str, d_model: int) -> Tuple[int, int, int]:
    attn = model.get_submodule(f"{prefix}.{family.attention}" if prefix else family.attention)
    if family.name == "fair-esm":
        return attn.num_heads, attn.num_heads, attn.head_dim
    if family.name == "hf-bert":
        return attn.num_attention_heads, attn.num_attention_heads, attn.attention_head_size
    cfg = getattr(attn, "config", None) or getattr(model, "config", None)
    if cfg is None:
        raise LayoutError(f"cannot read head counts of {prefix!r}: no config on the attention module or the model")
    H = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or d_model // H
    return H, kv, hd


def detect_layout(model: nn.Module, family: Optional[str] = None) -> AttentionLayout:
    """Find the attention layout of `model`; raise `LayoutError` when it is absent or ambiguous."""
    if family and family not in FAMILIES:
        raise LayoutError(f"unknown layout family {family!r}; known: {', '.join(FAMILIES)}")
    candidates = {family: FAMILIES[family]} if family else FAMILIES
    found = {n: p for n, f in candidates.items() if (p := _layer_prefixes(model, f))}
    if not found:
        looked = "; ".join(f"{n}: {', '.join(f.proj.values())}" for n, f in candidates.items())
        raise LayoutError(f"no known attention layout in {type(model).__name__} (looked for {looked}). "
                          "Pass an AttentionLayout with the model's layer paths explicitly.")
    if len(found) > 1:
        raise LayoutError(f"{type(model).__name__} matches several layouts ({', '.join(found)}); "
                          "pass family=... to choose")
    (name, prefixes), = found.items()
    fam = FAMILIES[name]
    q = model.get_submodule(f"{prefixes[0]}.{fam.proj['q']}" if prefixes[0] else fam.proj["q"])
    d_model = q.in_features
    H, kv, hd = _head_counts(model, fam, prefixes[0], d_model)
    layout = AttentionLayout(name, len(prefixes), d_model, H, hd, kv, tuple(prefixes))
    _check_shapes(model, layout)
    return layout


def _check_shapes(model: nn.Module, layout: AttentionLayout) -> None:
    for layer in range(layout.n_layers):
        for m in MATRICES:
            lin = model.get_submodule(layout.projection_path(layer, m))
            want = layout.linear_shape(m)
            got = (lin.out_features, lin.in_features)
            if got != want:
                raise LayoutError(f"{layout.projection_path(layer, m)} is {got[0]}x{got[1]} (out x in) but the "
                                  f"layout (d={layout.d_model}, H={layout.n_heads}, H_kv={layout.n_kv_heads}, "
                                  f"d_H={layout.head_dim}) expects {want[0]}x{want[1]}")


def prepare_model(model: nn.Module, layout: AttentionLayout) -> None:
    """Make sure the model calls its projections as modules, so adapters cannot be bypassed.

    fair-esm's MultiheadAttention has a fused path (`F.multi_head_attention_forward`) that reads
    the q/k/v/o weights directly; ESM-2 never takes it (rotary), ESM-1b would.
    """
    if layout.family != "fair-esm":
        return
    for prefix in layout.layer_paths:
        attn = model.get_submodule(f"{prefix}.self_attn" if prefix else "self_attn")
        if hasattr(attn, "enable_torch_version"):
            attn.enable_torch_version = False
