"""Which base model an adapter was made for: its `base` record, written at save time, checked at load.

    "base": {"name": "runs/minilm", "architecture": "bert", "dtype": "float32",
             "sha256": {"float32": "…", "bfloat16": "…", "float16": "…"}}

The fingerprint is of the frozen weights the adapter adapts, not of a file: SHA-256 over every
logical projection of the layouts (q, k, v, o of each layer, in (layout, layer, matrix) order; a
fused q/k/v Linear is split into its logical matrices first), each as a `layer.matrix:out×in;`
header and its weight's float32 bytes (C order). The same ESM-2 in fair-esm's and in Hugging Face's
layout therefore has one fingerprint. It is also recorded with the weights rounded to bfloat16 and
to float16, so a base stored in reduced precision (`model.lm.storage_dtype=bfloat16`) is still
recognised: two bases are compared at the coarser of their two storage precisions.

`architecture` is the model's kind (Hugging Face `model_type`; `esm` for fair-esm's ESM-2/ESM-1b,
`esmfold` for ESMFold's trunk): adapters never cross architectures (a BERT adapter onto an ESM-2
is refused whatever its fingerprint). A different fingerprint of the same architecture is refused
unless the caller allows it (`allow_other_base=True`, `--allow-other-base`).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .layouts import AttentionLayout

PRECISIONS: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE = {torch.float32: "float32", torch.float64: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
Linears = Callable[[str], nn.Linear]  # module path -> the model's Linear


def logical_weights(linear: Linears, layouts: Sequence[AttentionLayout]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(`index.layer.matrix`, weight) of every logical projection, in the canonical order."""
    for i, layout in enumerate(layouts):
        for layer in range(layout.n_layers):
            for relative, matrices in layout.groups():
                weight = linear(layout.linear_path(layer, relative)).weight.detach()
                for m, w in layout.split(matrices, weight, dim=0).items():
                    yield f"{i}.{layer}.{m}", w


def fingerprints(linear: Linears, layouts: Sequence[AttentionLayout],
                 precisions: Sequence[str] = tuple(PRECISIONS)) -> Dict[str, str]:
    """SHA-256 (hex) of the adapted weights at each precision (see the module docstring)."""
    hashers = {p: hashlib.sha256() for p in precisions}
    for key, w in logical_weights(linear, layouts):
        header = f"{key}:{w.shape[0]}x{w.shape[1]};".encode()
        w = w.to("cpu")
        for p, h in hashers.items():
            h.update(header)
            h.update(w.to(PRECISIONS[p]).to(torch.float32).contiguous().numpy().data)
    return {p: h.hexdigest() for p, h in hashers.items()}


def storage_precision(linear: Linears, layouts: Sequence[AttentionLayout]) -> str:
    """The precision the adapted weights are stored in (float32, bfloat16 or float16)."""
    _, w = next(logical_weights(linear, layouts[:1]))
    return _STORAGE.get(w.dtype, "float32")


def architecture_of(model: Optional[nn.Module], layouts: Sequence[AttentionLayout]) -> Optional[str]:
    """The model's kind: Hugging Face model_type, `esm` (fair-esm), `esmfold` (trunk); None when unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    families = {l.family for l in layouts}
    if families & {"esmfold-seq", "esmfold-tri"}:
        return "esmfold"
    if "fair-esm" in families:
        return "esm"
    return None


def name_of(model: Optional[nn.Module]) -> Optional[str]:
    """The model's name or path as Hugging Face knows it, else its class name."""
    if model is None:
        return None
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__


def base_record(model: Optional[nn.Module], linear: Linears, layouts: Sequence[AttentionLayout],
                merged: bool = False, name: Optional[str] = None) -> dict:
    """The `base` entry of an adapter saved from these weights (computed once, at save time).

    A merged adapter's base weights are gone (they hold the update): its record has no fingerprint.
    """
    record = {"name": name or name_of(model), "architecture": architecture_of(model, layouts)}
    if merged:
        return {**record, "dtype": None, "sha256": None,
                "note": "saved while merged: the base weights could not be fingerprinted"}
    return {**record, "dtype": storage_precision(linear, layouts), "sha256": fingerprints(linear, layouts)}


def check_record(entry, where: str) -> Optional[str]:
    """What is wrong with a `base` entry read from a file (None: nothing)."""
    if not isinstance(entry, dict):
        return f"{where} should be an object, found {type(entry).__name__}"
    for key in ("name", "architecture", "dtype"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"{where}.{key} should be a string or null"
    digests = entry.get("sha256")
    if digests is not None and (not isinstance(digests, dict) or not digests
                                or not all(isinstance(v, str) for v in digests.values())):
        return f"{where}.sha256 should be an object of hex digests by precision"
    return None


def compare_at(a: Optional[str], b: Optional[str]) -> str:
    """The precision two bases are compared at: the coarser of their storage precisions."""
    both = {a or "float32", b or "float32"}
    return "bfloat16" if "bfloat16" in both else "float16" if "float16" in both else "float32"


def _label(record: dict, digest: Optional[str]) -> str:
    kind = f"{record.get('architecture')} " if record.get("architecture") else ""
    return f"{kind}{record.get('name') or 'unnamed model'}" + (f" (sha256 {digest[:12]}…)" if digest else "")


def base_mismatch(saved: dict, model: Optional[nn.Module], linear: Linears, layouts: Sequence[AttentionLayout],
                  allow_other_base: bool) -> Tuple[Optional[str], Optional[str]]:
    """(fault, warning) of loading an adapter made for `saved` onto these weights; both None: the same base.

    An architecture difference is always a fault; another fingerprint is one unless allowed (then a warning).
    """
    arch = architecture_of(model, layouts)
    mine = {"name": name_of(model), "architecture": arch}
    if saved.get("architecture") and arch and saved["architecture"] != arch:
        return (f"made for a {saved['architecture']} model ({saved.get('name') or 'unnamed'}), this is a {arch} "
                f"model ({mine['name']}); adapters never cross architectures"), None
    digests = saved.get("sha256")
    if not digests:
        return None, None
    precision = compare_at(saved.get("dtype"), storage_precision(linear, layouts))
    if precision not in digests:
        return None, f"the adapter's base has no {precision} fingerprint to compare; not checked"
    ours = fingerprints(linear, layouts, (precision,))[precision]
    if ours == digests[precision]:
        return None, None
    text = f"made for another base model: saved for {_label(saved, digests[precision])}, this is {_label(mine, ours)}"
    if allow_other_base:
        return None, text + "; loaded anyway (allow_other_base)"
    return text + "; pass allow_other_base=True (--allow-other-base) to load it anyway", None
