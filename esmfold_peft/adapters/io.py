"""Saving and loading adapters: a directory with `adapter_config.json` + `adapter_model.safetensors`.

LoRTA's factors are stored once for the whole model (`lorta.A`, `lorta.B`, `lorta.C_H`, `lorta.C_L`,
`lorta.C_M`; shapes per tensor mode in `lorta.py`), LoRA's as `lora.{layer}.{matrix}.{A,B}`.
The weights get a SHA-256 sidecar (`adapter_model.safetensors.sha256`) when written.

An adapter over one layout family stores its layout as `"layout": {...}` (format_version 1); one
over several families (ESMFold's trunk) as `"layouts": [{...}, ...]` (format_version 2), with
each tensor name prefixed by its family (`esmfold-seq.lorta.A`, `esmfold-tri.lorta.A`).

Loading is strict and checked before the model is touched: the config must have the documented
structure, the weights must verify against their checksum, parse, and be finite floating-point
tensors of exactly the expected names and shapes, and the layout must be the model's. Each fault is
an `AdapterLoadError` (an `ArtifactError`) naming the file and the fault in one line; nothing is
ever loaded partially.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write
from ..runtime.artifacts import load_safetensors, read_json, require_keys, save_safetensors
from ..runtime.errors import ArtifactError
from .base import config_from_dict, method
from .config import AdapterConfigError
from .inject import (AdapterSet, LayoutSpec, add_adapter, attach, find_adapter_set, freeze_base, get_adapter_set,
                     resolve_layouts, unload)
from .layouts import FAMILIES, AttentionLayout, LayoutError, detect_layout, detect_layouts, layouts_differences

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2  # the newest this library reads; files are written in the oldest that describes them
# the fields of a saved layout and their JSON types (n_kv_heads may be null in hand-written files)
LAYOUT_KEYS = {"family": str, "n_layers": int, "d_model": int, "n_heads": int, "head_dim": int}
OPTIONAL_LAYOUT_KEYS = {"n_kv_heads": (int, type(None))}


class AdapterLoadError(ArtifactError):
    """An adapter directory that cannot be loaded: missing, damaged, malformed or made for another model."""


def save_adapter(model_or_set: Union[nn.Module, AdapterSet], directory: Union[str, os.PathLike],
                 name: Optional[str] = None) -> Path:
    """Write the named (default: active) adapter to `directory`, atomically per file."""
    aset = model_or_set if isinstance(model_or_set, AdapterSet) else get_adapter_set(model_or_set)
    adapter = aset.get(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    several = len(aset.layouts) > 1
    meta = {
        "format_version": 2 if several else 1,
        "library": f"esmfold-peft {__version__}",
        "name": name or aset.active,
        "method": adapter.method,
        "config": adapter.config.to_dict(),
        **({"layouts": [l.describe() for l in aset.layouts]} if several else {"layout": aset.layout.describe()}),
        "num_parameters": sum(p.numel() for p in adapter.parameters()),
    }
    save_safetensors(adapter.saved_tensors(), directory / WEIGHTS_NAME, metadata={"method": adapter.method})
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


# --- reading and checking the files ------------------------------------------------------------------

def _as_load_error(exc: ArtifactError) -> AdapterLoadError:
    return exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(exc.path, exc.fault)


def _parse_layout(entry, path: Path) -> AttentionLayout:
    if not isinstance(entry, dict):
        raise AdapterLoadError(path, f"'layout' should be an object, found {type(entry).__name__}")
    require_keys(entry, LAYOUT_KEYS, path)
    if entry["family"] not in FAMILIES:
        raise AdapterLoadError(path, f"unknown layout family {entry['family']!r}; known: {', '.join(FAMILIES)}")
    for key, kinds in OPTIONAL_LAYOUT_KEYS.items():
        if key in entry and (not isinstance(entry[key], kinds) or isinstance(entry[key], bool)):
            raise AdapterLoadError(path, f"layout key {key!r} should be an integer or null, "
                                         f"found {type(entry[key]).__name__}")
    unknown = sorted(set(entry) - set(LAYOUT_KEYS) - set(OPTIONAL_LAYOUT_KEYS))
    if unknown:
        raise AdapterLoadError(path, f"layout has unknown keys: {', '.join(unknown)}")
    try:
        return AttentionLayout(**entry)
    except LayoutError as exc:
        raise AdapterLoadError(path, f"layout: {exc}") from exc


def _saved_layouts(meta: dict, path: Path) -> Tuple[AttentionLayout, ...]:
    if ("layout" in meta) == ("layouts" in meta):
        raise AdapterLoadError(path, "needs exactly one of the keys 'layout' (one family) and 'layouts' (several)")
    if "layout" in meta:
        return (_parse_layout(meta["layout"], path),)
    entries = meta["layouts"]
    if not isinstance(entries, list) or not entries:
        raise AdapterLoadError(path, "'layouts' should be a non-empty array of layout objects")
    layouts = tuple(_parse_layout(e, path) for e in entries)
    families = [l.family for l in layouts]
    if len(set(families)) != len(families):
        raise AdapterLoadError(path, f"'layouts' names a family twice: {', '.join(families)}")
    return layouts


def _check_structure(meta: dict, path: Path) -> None:
    require_keys(meta, {"method": str, "config": dict}, path)
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterLoadError(path, f"key 'format_version' should be an integer, found {type(version).__name__}")
    if version > FORMAT_VERSION:
        raise AdapterLoadError(path, f"format_version {version} is newer than this library reads "
                                     f"(up to {FORMAT_VERSION})")


def _read(directory: Path):
    """(meta, config, layouts) of an adapter directory, every structural fault an AdapterLoadError."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(directory, f"no {CONFIG_NAME} here (is this an adapter directory?)")
    try:
        meta = read_json(path, dict, "adapter config")
        _check_structure(meta, path)
        layouts = _saved_layouts(meta, path)
    except ArtifactError as exc:
        raise _as_load_error(exc) from exc
    try:
        method(meta["method"])
        config = config_from_dict({**meta["config"], "method": meta["method"]})
    except (AdapterConfigError, TypeError) as exc:  # TypeError: a value of a type the dataclass cannot take
        raise AdapterLoadError(path, f"config: {exc}") from exc
    return meta, config, layouts


def read_adapter_config(directory: Union[str, os.PathLike]) -> dict:
    """The checked contents of `directory/adapter_config.json`."""
    return _read(Path(directory))[0]


def _read_weights(directory: Path) -> dict:
    try:
        return load_safetensors(directory / WEIGHTS_NAME)
    except ArtifactError as exc:
        raise _as_load_error(exc) from exc


# --- loading into a model ----------------------------------------------------------------------------

def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], name: str = "default",
                 layout: LayoutSpec = None, freeze: bool = True, activate: bool = True) -> nn.Module:
    """Load an adapter saved by `save_adapter` into `model` under `name`; strict, all or nothing.

    Without `layout`, a model without adapters is matched on the families the adapter was saved for
    (so an ESMFold trunk adapter finds both of its families); a model with adapters on its set's.
    """
    directory = Path(directory)
    meta, config, saved = _read(directory)
    tensors = _read_weights(directory)  # every file check happens before the model is touched
    target = _model_layouts(model, saved, layout)
    diffs = layouts_differences(saved, target)
    if diffs:
        raise AdapterLoadError(directory / CONFIG_NAME, "made for another attention layout (saved vs model): "
                                                        + "; ".join(diffs))
    had_set = find_adapter_set(model) is not None
    aset = attach(model, target)
    try:
        adapter = _add_checked(model, aset, config, tensors, directory, name)
    except Exception:
        if not had_set:  # leave the model as it was: no adapter set we created
            unload(model, merge=False)
        raise
    if activate:
        aset.set_active(name)
    if freeze:
        freeze_base(model)
    return adapter


def _model_layouts(model: nn.Module, saved: Tuple[AttentionLayout, ...], layout: LayoutSpec):
    """The model's layouts to compare with the saved ones (see load_adapter)."""
    if layout is not None:
        return resolve_layouts(model, layout)
    existing = find_adapter_set(model)
    if existing is not None:
        return existing.layouts
    found = detect_layouts(model)
    matching = tuple(found[l.family] for l in saved if l.family in found)
    if len(matching) == len(saved):
        return matching
    return tuple(found.values()) or (detect_layout(model),)  # with none found, detect_layout says what it sought


def _add_checked(model, aset: AdapterSet, config, tensors: dict, directory: Path, name: str) -> nn.Module:
    if name in aset.adapters:
        raise AdapterLoadError(directory, f"the model already has an adapter named {name!r} "
                                          f"({aset.adapters[name].method}); load under another name or remove it first")
    adapter = add_adapter(model, config, name=name, layout=None, freeze=False)
    try:
        _copy_strict(adapter, tensors, directory / WEIGHTS_NAME)
    except AdapterLoadError:
        aset.remove(name)
        raise
    return adapter


def _copy_strict(adapter: nn.Module, tensors: dict, path: Path) -> None:
    expected = adapter.saved_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: saved {tuple(tensors[k].shape)} vs expected {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else ""))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:8]))
    if problems:
        raise AdapterLoadError(path, f"does not match its {adapter.method} config: " + " | ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))
