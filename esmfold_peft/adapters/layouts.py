"""Where a transformer keeps its attention projections, and how heads split them.

A layout is the only thing the adapter core knows about a model: for each layer, the module paths
of the q/k/v/o projections (all `nn.Linear`), the model width `d`, the number of query heads `H`,
of key/value heads `H_kv` (grouped-query attention when `H_kv < H`) and the head width `d_H`.

Head axis: heads split the **output** features of q, k, v (logical row h·d_H + j) and
the **input** features of o (in index h·d_H + j). `A` runs along the model dimension `d`.

Fused projections. A family may keep q, k and v in one Linear (d → P·H·d_H for P fused parts, in
q, k, v order). Adapters only ever see the logical matrices; the layout maps their rows onto the
fused Linear with one rule, interleaved per head (ESMFold's `view(H, P, d_H)` on the output rows):

    fused row (h·P + p)·d_H + j  =  logical row h·d_H + j of part p

`fuse` applies this rule, along the last axis to activations (hooks) and along the first axis
to weights (merging), so both always agree. o is never fused (its heads are on the input).

Known families, detected from module names:

| family | "layer" (one index l) | projections (relative to it) | heads read from |
|---|---|---|---|
| `fair-esm` (ESM-2, ESM-1b) | a transformer layer | `self_attn.{q,k,v,out}_proj` | `self_attn.num_heads`, `.head_dim` |
| `hf-bert` (BERT, RoBERTa, HF ESM) | a transformer layer | `attention.self.{query,key,value}`, `attention.output.dense` | `attention.self.num_attention_heads` |
| `hf-mpnet` (MPNet) | a transformer layer | `attention.attn.{q,k,v,o}` | `attention.attn.num_attention_heads` |
| `hf-llama` (Llama, Mistral, Qwen2, SmolLM…) | a transformer layer | `self_attn.{q,k,v,o}_proj` | the attention's `config` (GQA aware) |
| `esmfold-seq` (ESMFold trunk) | a trunk block | `seq_attention.proj` (q, k, v fused), `seq_attention.o_proj` | `seq_attention.num_heads`, `.head_width` |
| `esmfold-tri` (ESMFold trunk) | a triangle attention module | `mha.linear_{q,k,v,o}` | `mha.no_heads`, `.c_hidden` |

ESMFold's triangle attention: every trunk block holds two modules, `tri_att_start` and
`tri_att_end` (openfold's `Attention`: q/k/v without bias, o with bias; q is scaled by 1/√d_H
after its projection, so an update of W_q is scaled with it, as the base weights are). They are
separate layers of the family, in model order: l = 2·block + (0 for start, 1 for end), so
L = 2·blocks (96 for the 48-block esmfold_3B_v1 trunk). The gates (`seq_attention.g_proj`,
`mha.linear_g`) are not attention projections and are not adapted.

A model may hold several families (a trunk holds both ESMFold ones): `detect_layouts` finds them
all, `detect_layout` insists on one, and an adapter over several is one per family (`inject.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

MATRICES: Tuple[str, ...] = ("q", "k", "v", "o")


class LayoutError(ValueError):
    """The model's attention layout cannot be determined or does not match what was asked for."""


@dataclass(frozen=True)
class Family:
    name: str
    proj: Dict[str, str]  # matrix -> Linear path relative to the layer; q, k, v may share one (fused)
    attention: str  # path of the module that knows the head counts
    head_attrs: Optional[Tuple[str, str]]  # its (heads, head width) attributes; None: read its HF config

    def __post_init__(self):
        for path, matrices in self.groups():
            if len(matrices) > 1 and "o" in matrices:
                raise LayoutError(f"{self.name}: o cannot share a Linear with {matrices} (its heads are on the input)")

    def groups(self) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
        """(Linear path, the matrices it holds in q, k, v, o order), one entry per distinct Linear."""
        paths = list(dict.fromkeys(self.proj[m] for m in MATRICES))
        return tuple((p, tuple(m for m in MATRICES if self.proj[m] == p)) for p in paths)


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("fair-esm", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                        "o": "self_attn.out_proj"}, "self_attn", ("num_heads", "head_dim")),
    Family("hf-bert", {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                       "o": "attention.output.dense"}, "attention.self", ("num_attention_heads", "attention_head_size")),
    Family("hf-mpnet", {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
                        "o": "attention.attn.o"}, "attention.attn", ("num_attention_heads", "attention_head_size")),
    Family("hf-llama", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                        "o": "self_attn.o_proj"}, "self_attn", None),
    Family("esmfold-seq", {"q": "seq_attention.proj", "k": "seq_attention.proj", "v": "seq_attention.proj",
                           "o": "seq_attention.o_proj"}, "seq_attention", ("num_heads", "head_width")),
    Family("esmfold-tri", {"q": "mha.linear_q", "k": "mha.linear_k", "v": "mha.linear_v", "o": "mha.linear_o"},
           "mha", ("no_heads", "c_hidden")),
)}


@dataclass(frozen=True)
class AttentionLayout:
    """Shape of one family's attention stack, plus (when built from a model) where each layer lives."""

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
        fused = self.family in FAMILIES and any(len(ms) > 1 for _, ms in FAMILIES[self.family].groups())
        if fused and self.n_kv_heads != self.n_heads:
            raise LayoutError(f"{self.family} fuses q/k/v per head, which needs as many key/value heads as "
                              f"query heads (got {self.n_heads} and {self.n_kv_heads})")

    # shape of each projection as an nn.Linear (out_features, in_features), before any fusing
    def linear_shape(self, matrix: str) -> Tuple[int, int]:
        qd, kvd = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": (qd, self.d_model), "k": (kvd, self.d_model), "v": (kvd, self.d_model),
                "o": (self.d_model, qd)}[matrix]

    def heads_of(self, matrix: str) -> int:
        return self.n_kv_heads if matrix in ("k", "v") else self.n_heads

    def groups(self) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
        """(Linear path relative to a layer, the matrices it holds) for each Linear of a layer."""
        if self.family not in FAMILIES:
            raise LayoutError(f"layout family {self.family!r} has no module paths")
        return FAMILIES[self.family].groups()

    def linear_path(self, layer: int, relative: str) -> str:
        if not self.layer_paths:
            raise LayoutError("this layout was built from a specification, not a model: it has no module paths")
        prefix = self.layer_paths[layer]
        return f"{prefix}.{relative}" if prefix else relative

    def projection_path(self, layer: int, matrix: str) -> str:
        """Path of the Linear holding `matrix` of `layer` (the fused Linear for a fused q/k/v)."""
        return self.linear_path(layer, FAMILIES[self.family].proj[matrix])

    def fused_shape(self, matrices: Sequence[str]) -> Tuple[int, int]:
        """(out, in) of the Linear that holds `matrices` (their outputs stacked)."""
        return sum(self.linear_shape(m)[0] for m in matrices), self.linear_shape(matrices[0])[1]

    def fuse(self, matrices: Sequence[str], pieces: Dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        """The rows of the Linear holding `matrices`, from per-matrix pieces along `dim`.

        A Linear of its own gets its piece unchanged. A fused one interleaves per head: fused row
        (h·P + p)·d_H + j is logical row h·d_H + j of matrices[p]; a matrix without a piece
        (not targeted) contributes zeros. Works on activations (dim=-1) and on ΔW (dim=0) alike.
        """
        if len(matrices) == 1:
            return pieces[matrices[0]]
        ref = next(iter(pieces.values()))
        dim %= ref.dim()
        parts = [pieces[m] if m in pieces else torch.zeros_like(ref) for m in matrices]
        heads = [t.unflatten(dim, (self.n_heads, self.head_dim)) for t in parts]
        return torch.stack(heads, dim=dim + 1).flatten(dim, dim + 2)

    def split(self, matrices: Sequence[str], tensor: torch.Tensor, dim: int) -> Dict[str, torch.Tensor]:
        """`fuse` undone: each matrix's logical rows of the Linear holding `matrices`, along `dim`."""
        if len(matrices) == 1:
            return {matrices[0]: tensor}
        dim %= tensor.dim()
        heads = tensor.unflatten(dim, (self.n_heads, len(matrices), self.head_dim))
        return {m: heads.select(dim + 1, p).flatten(dim, dim + 1) for p, m in enumerate(matrices)}

    def describe(self) -> dict:
        """The fields that must agree between a saved adapter and a model (paths excluded)."""
        return {"family": self.family, "n_layers": self.n_layers, "d_model": self.d_model,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}

    def differences(self, other: "AttentionLayout") -> List[str]:
        mine, theirs = self.describe(), other.describe()
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]


def layouts_differences(mine: Sequence[AttentionLayout], theirs: Sequence[AttentionLayout]) -> List[str]:
    """What differs between two lists of layouts (one per family), as `field: mine vs theirs`."""
    if len(mine) == len(theirs) == 1:
        return mine[0].differences(theirs[0])
    names = lambda layouts: ", ".join(l.family for l in layouts)  # noqa: E731
    if [l.family for l in mine] != [l.family for l in theirs]:
        return [f"families: {names(mine) or 'none'} vs {names(theirs) or 'none'}"]
    return [f"{a.family} {d}" for a, b in zip(mine, theirs) for d in a.differences(b)]


def unfused(family: str) -> bool:
    """Whether every projection of `family` is a Linear of its own (no fused q/k/v)."""
    return family in FAMILIES and all(len(ms) == 1 for _, ms in FAMILIES[family].groups())


def only_family_differs(mine: Sequence[AttentionLayout], theirs: Sequence[AttentionLayout]) -> bool:
    """Two single layouts of the same shape in two unfused families (fair-esm's ESM-2 and Hugging Face's):
    their logical q/k/v/o matrices are the same nn.Linear-shaped maps, so an adapter's tensors mean the
    same on both (whether the *weights* are the same is the base fingerprint's question)."""
    if len(mine) != 1 or len(theirs) != 1 or mine[0].family == theirs[0].family:
        return False
    a, b = mine[0], theirs[0]
    return unfused(a.family) and unfused(b.family) and [d for d in a.differences(b) if not d.startswith("family")] == []


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
    # the folding trunk of esmfold_3B_v1: 48 blocks, sequence state 1024 (32 heads of 32), pair state 128
    "esmfold_3B_v1_seq": _spec("esmfold-seq", 48, 1024, 32),
    "esmfold_3B_v1_tri": _spec("esmfold-tri", 96, 128, 4),
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


def _join(prefix: str, relative: str) -> str:
    return f"{prefix}.{relative}" if prefix else relative


def _layer_prefixes(modules: Dict[str, nn.Module], family: Family) -> List[str]:
    """Layer prefixes (in model order) under which all projections of `family` exist as nn.Linear."""
    prefixes = []
    for name in modules:
        if not _ends_with(name, family.proj["q"]):
            continue
        prefix = name[: len(name) - len(family.proj["q"])].rstrip(".")
        if all(isinstance(modules.get(_join(prefix, p)), nn.Linear) for p, _ in family.groups()):
            prefixes.append(prefix)
    return prefixes


def _head_counts(model: nn.Module, family: Family, prefix: str, d_model: int) -> Tuple[int, int, int]:
    attn = model.get_submodule(_join(prefix, family.attention))
    if family.head_attrs is not None:
        heads, width = (getattr(attn, a) for a in family.head_attrs)
        return heads, heads, width
    cfg = getattr(attn, "config", None) or getattr(model, "config", None)
    if cfg is None:
        raise LayoutError(f"cannot read head counts of {prefix!r}: no config on the attention module or the model")
    H = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or d_model // H
    return H, kv, hd


def _layout_of(model: nn.Module, family: Family, prefixes: List[str]) -> AttentionLayout:
    d_model = model.get_submodule(_join(prefixes[0], family.proj["q"])).in_features
    H, kv, hd = _head_counts(model, family, prefixes[0], d_model)
    layout = AttentionLayout(family.name, len(prefixes), d_model, H, hd, kv, tuple(prefixes))
    _check_shapes(model, layout)
    return layout


def _find(model: nn.Module, candidates: Dict[str, Family]) -> Dict[str, List[str]]:
    modules = dict(model.named_modules())
    return {name: p for name, fam in candidates.items() if (p := _layer_prefixes(modules, fam))}


def detect_layouts(model: nn.Module) -> Dict[str, AttentionLayout]:
    """Every known attention family found in `model` (family -> layout); {} when none."""
    return {name: _layout_of(model, FAMILIES[name], prefixes) for name, prefixes in _find(model, FAMILIES).items()}


def detect_layout(model: nn.Module, family: Optional[str] = None) -> AttentionLayout:
    """The attention layout of `model` (of `family`); `LayoutError` when it is absent or ambiguous."""
    if family and family not in FAMILIES:
        raise LayoutError(f"unknown layout family {family!r}; known: {', '.join(FAMILIES)}")
    candidates = {family: FAMILIES[family]} if family else FAMILIES
    found = _find(model, candidates)
    if not found:
        looked = "; ".join(f"{n}: {', '.join(dict.fromkeys(f.proj.values()))}" for n, f in candidates.items())
        raise LayoutError(f"no known attention layout in {type(model).__name__} (looked for {looked}). "
                          "Pass an AttentionLayout with the model's layer paths explicitly.")
    if len(found) > 1:
        raise LayoutError(f"{type(model).__name__} matches several layouts ({', '.join(found)}); pass one "
                          f"family, or several as layout=({', '.join(map(repr, found))}) for one tensor each")
    (name, prefixes), = found.items()
    return _layout_of(model, FAMILIES[name], prefixes)


def _check_shapes(model: nn.Module, layout: AttentionLayout) -> None:
    for layer in range(layout.n_layers):
        for relative, matrices in layout.groups():
            path = layout.linear_path(layer, relative)
            lin = model.get_submodule(path)
            want, got = layout.fused_shape(matrices), (lin.out_features, lin.in_features)
            if got != want:
                raise LayoutError(f"{path} ({'+'.join(matrices)}) is {got[0]}x{got[1]} (out x in) but the layout "
                                  f"(d={layout.d_model}, H={layout.n_heads}, H_kv={layout.n_kv_heads}, "
                                  f"d_H={layout.head_dim}) expects {want[0]}x{want[1]}")


def prepare_model(model: nn.Module, layout: AttentionLayout) -> None:
    """Make sure the model calls its projections as modules, so adapters cannot be bypassed.

    fair-esm's MultiheadAttention has a fused path (`F.multi_head_attention_forward`) that reads
    the q/k/v/o weights directly; ESM-2 never takes it (rotary), ESM-1b would. ESMFold's trunk
    attentions always call their Linears.
    """
    if layout.family != "fair-esm":
        return
    for prefix in layout.layer_paths:
        attn = model.get_submodule(_join(prefix, "self_attn"))
        if hasattr(attn, "enable_torch_version"):
            attn.enable_torch_version = False
