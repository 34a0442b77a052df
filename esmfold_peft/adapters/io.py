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

Adapters travel. The config records `library`, `library_version`, a one-line `how_to_load`, and
the `base` the adapter was made for (name, architecture, fingerprint of the adapted weights; see
`provenance`): loading onto another architecture is refused, onto other weights of the same one
too unless `allow_other_base=True`; a folder without a base record loads with a warning (once).
The fingerprint is of the weights, so the same ESM-2 in fair-esm's layout and in Hugging Face's is
one base, and an adapter made on one loads onto the other (same shapes, unfused families: the
logical q/k/v/o matrices and so the tensors mean the same). A LoRA adapter is also written and read
in Hugging Face PEFT's format (`format="peft"`, `peft_format`), and a classification head saved
beside an adapter (`head.safetensors`, see `head`) is restored with it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write
from ..runtime.artifacts import load_safetensors, read_json, require_keys, save_safetensors
from ..runtime.errors import ArtifactError
from . import peft_format
from .base import config_from_dict, method
from .config import AdapterConfigError
from .files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, metadata_base
from .head import check_head, copy_head, read_head, save_head
from .inject import (AdapterSet, LayoutSpec, add_adapter, attach, find_adapter_set, freeze_base, get_adapter_set,
                     resolve_layouts, unload)
from .layouts import (FAMILIES, AttentionLayout, LayoutError, detect_layout, detect_layouts, layouts_differences,
                      only_family_differs)
from .provenance import architecture_of, base_mismatch, base_record, check_record

log = logging.getLogger("esmfold_peft.adapters")
FORMAT_VERSION = 2  # the newest this library reads; files are written in the oldest that describes them
FORMATS = ("native", "peft")
LIBRARY = "esmfold-peft"
# the fields of a saved layout and their JSON types (n_kv_heads may be null in hand-written files)
LAYOUT_KEYS = {"family": str, "n_layers": int, "d_model": int, "n_heads": int, "head_dim": int}
OPTIONAL_LAYOUT_KEYS = {"n_kv_heads": (int, type(None))}
_UNCHECKED_WARNED: set = set()  # folders already warned about (once each): no base record to check


def _how_to_load(adapter_method: str) -> str:
    line = "from esmfold_peft.adapters import load_adapter; load_adapter(model, DIR)"
    if adapter_method == "lora":
        return line + "; for PEFT: python scripts/convert_adapter.py --to peft --adapter DIR --out PEFT_DIR --base MODEL_DIR"
    return line + f" (PEFT has no {adapter_method} type: this folder is esmfold-peft's)"


def save_adapter(model_or_set: Union[nn.Module, AdapterSet], directory: Union[str, os.PathLike],
                 name: Optional[str] = None, format: str = "native", head: Sequence[str] = (),
                 base_name: Optional[str] = None, base: Optional[dict] = None) -> Path:
    """Write the named (default: active) adapter to `directory`, atomically per file.

    `format="peft"` writes a LoRA adapter as Hugging Face PEFT does (`peft_format`). `head` names
    parameters of the model trained beside the adapter (a classification head) to store with it.
    Either way the config records the base model: its name (`base_name`, else the model's), its
    architecture and a fingerprint of the adapted weights (`provenance`); `base` gives the record
    instead (a converted adapter keeps the one it was made with).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    given_set = isinstance(model_or_set, AdapterSet)
    aset = model_or_set if given_set else get_adapter_set(model_or_set)
    model = None if given_set else model_or_set
    adapter = aset.get(name)
    params = dict(model.named_parameters()) if model is not None else {}
    missing = [n for n in head if n not in params]
    if missing:
        raise ValueError(f"head parameters not in the model: {', '.join(missing[:4])}")
    head_tensors = {n: params[n] for n in head}
    directory = Path(directory)
    if format == "peft":
        if len(aset.layouts) != 1:
            raise ValueError("PEFT's format holds one attention family; this adapter spans " + ", ".join(aset.families))
        peft_format.write(adapter, aset.layout, model, {}, {}, None)  # refuses LoRTA and fused layouts before any work
    if base is None:
        base = base_record(model, aset._linears.__getitem__, aset.layouts, merged=aset.merged is not None,
                           name=base_name)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        hub_name = base_name or (getattr(model, "name_or_path", None) or None)  # a path or hub id, never a class
        meta, tensors, header = peft_format.write(adapter, aset.layout, model, base, head_tensors, hub_name)
        save_safetensors(tensors, directory / WEIGHTS_NAME, metadata=header)
    else:
        meta = _native_config(aset, adapter, name, base)
        save_safetensors(adapter.saved_tensors(), directory / WEIGHTS_NAME, metadata={"method": adapter.method})
        if head_tensors:
            save_head(head_tensors, directory)
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _native_config(aset: AdapterSet, adapter, name: Optional[str], base: dict) -> dict:
    several = len(aset.layouts) > 1
    return {
        "format_version": 2 if several else 1,
        "library": LIBRARY,
        "library_version": __version__,
        "how_to_load": _how_to_load(adapter.method),
        "name": name or aset.active,
        "method": adapter.method,
        "config": adapter.config.to_dict(),
        **({"layouts": [l.describe() for l in aset.layouts]} if several else {"layout": aset.layout.describe()}),
        "num_parameters": sum(p.numel() for p in adapter.parameters()),
        "base": base,
    }


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
    fault = check_record(meta["base"], "key 'base'") if "base" in meta else None
    if fault:
        raise AdapterLoadError(path, fault)


def _read_meta(directory: Path) -> dict:
    """The JSON object of `directory/adapter_config.json` (ours or PEFT's), checked for PEFT's part."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(directory, f"no {CONFIG_NAME} here (is this an adapter directory?)")
    try:
        meta = read_json(path, dict, "adapter config")
    except ArtifactError as exc:
        raise _as_load_error(exc) from exc
    if "peft_type" in meta:  # a Hugging Face PEFT folder
        peft_format.check_config(meta, path)
    return meta


def _read(directory: Path):
    """(meta, config, layouts) of an adapter directory, every structural fault an AdapterLoadError."""
    path = directory / CONFIG_NAME
    meta = _read_meta(directory)
    if "peft_type" in meta:
        raise AdapterLoadError(path, "a PEFT LoRA adapter: it has no esmfold-peft layout until it meets a model "
                                     "(load_adapter reads it)")
    try:
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
    """The checked contents of `directory/adapter_config.json` (a PEFT LoRA folder's: its PEFT config)."""
    meta = _read_meta(Path(directory))
    return meta if "peft_type" in meta else _read(Path(directory))[0]


def saved_base(directory: Union[str, os.PathLike]) -> Optional[dict]:
    """The base record of an adapter folder (ours: its config's; PEFT's: its weights header's); None if none."""
    directory = Path(directory)
    meta = _read_meta(directory)
    return metadata_base(directory / WEIGHTS_NAME) if "peft_type" in meta else _read(directory)[0].get("base")


def saved_head_names(directory: Union[str, os.PathLike]) -> list:
    """The parameter names of the classification head saved with an adapter ([] when none)."""
    directory = Path(directory)
    if "peft_type" not in _read_meta(directory):
        return sorted(read_head(directory))
    prefix = peft_format.PREFIX
    return sorted(k[len(prefix):] for k in _read_weights(directory) if k.startswith(prefix) and "lora_" not in k)


def is_peft_folder(directory: Union[str, os.PathLike]) -> bool:
    """Whether `directory` holds a Hugging Face PEFT adapter (its config has `peft_type`)."""
    return "peft_type" in _read_meta(Path(directory))


def _read_weights(directory: Path) -> dict:
    try:
        return load_safetensors(directory / WEIGHTS_NAME)
    except ArtifactError as exc:
        raise _as_load_error(exc) from exc


# --- loading into a model ----------------------------------------------------------------------------

class _Source(NamedTuple):
    """What an adapter folder holds, in our terms, read and checked before the model is touched."""
    path: Path  # its adapter_config.json
    config: object
    layouts: Tuple[AttentionLayout, ...]
    tensors: Dict[str, torch.Tensor]
    base: Optional[dict]
    head: Dict[str, torch.Tensor]


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], name: str = "default",
                 layout: LayoutSpec = None, freeze: bool = True, activate: bool = True,
                 allow_other_base: bool = False, head: bool = True) -> nn.Module:
    """Load an adapter folder into `model` under `name`; strict, all or nothing.

    The folder is ours (`save_adapter`) or a Hugging Face PEFT LoRA folder (`peft_type: LORA`).
    Without `layout`, a model without adapters is matched on the families the adapter was saved for
    (so an ESMFold trunk adapter finds both of its families); a model with adapters on its set's.
    The adapter's base record must name this model's architecture and fingerprint (another
    fingerprint loads with `allow_other_base=True`, and a warning); a classification head saved
    beside the adapter is restored too (`head=False`: left out).
    """
    source = _read_source(Path(directory), model, layout)  # every file check happens before the model is touched
    target = _target_layouts(model, source, layout)
    _check_base(model, source, target, allow_other_base)
    head_tensors = source.head if head else {}
    check_head(model, head_tensors, source.path.parent)
    had_set = find_adapter_set(model) is not None
    aset = attach(model, target)
    try:
        adapter = _add_checked(model, aset, source.config, source.tensors, source.path.parent, name)
    except Exception:
        if not had_set:  # leave the model as it was: no adapter set we created
            unload(model, merge=False)
        raise
    copy_head(model, head_tensors)
    if activate:
        aset.set_active(name)
    if freeze:
        freeze_base(model)
    return adapter


def _read_source(directory: Path, model: nn.Module, layout: LayoutSpec) -> _Source:
    meta = _read_meta(directory)
    path = directory / CONFIG_NAME
    if "peft_type" not in meta:
        meta, config, saved = _read(directory)
        return _Source(path, config, saved, _read_weights(directory), meta.get("base"), read_head(directory))
    tensors = _read_weights(directory)
    layouts = _peft_target(model, layout, path)
    try:
        config, ours, head = peft_format.read(meta, tensors, layouts[0], directory / WEIGHTS_NAME)
    except AdapterConfigError as exc:
        raise AdapterLoadError(path, f"config: {exc}") from exc
    base = metadata_base(directory / WEIGHTS_NAME)
    fault = check_record(base, f"{WEIGHTS_NAME} header 'esmfold_peft.base'") if base is not None else None
    if fault:
        raise AdapterLoadError(directory / WEIGHTS_NAME, fault)
    return _Source(path, config, layouts, ours, base, head)


def _peft_target(model: nn.Module, layout: LayoutSpec, path: Path) -> Tuple[AttentionLayout, ...]:
    """The model's one layout a PEFT folder is read against (its tensors name the model's modules)."""
    existing = find_adapter_set(model)
    layouts = resolve_layouts(model, layout) if layout is not None else \
        existing.layouts if existing is not None else (detect_layout(model),)
    if len(layouts) != 1:
        raise AdapterLoadError(path, "a PEFT adapter holds one attention family; the model's set has "
                                     + ", ".join(l.family for l in layouts))
    return layouts


def _target_layouts(model: nn.Module, source: _Source, layout: LayoutSpec) -> Tuple[AttentionLayout, ...]:
    """The model's layouts the adapter goes on: the saved ones, or the same architecture in another
    (unfused) family when the base record says it is the same kind of model (fair-esm's ESM-2 and HF's)."""
    target = _model_layouts(model, source.layouts, layout)
    diffs = layouts_differences(source.layouts, target)
    if not diffs:
        return target
    arch = (source.base or {}).get("architecture")
    if only_family_differs(source.layouts, target) and arch and arch == architecture_of(model, target):
        return target
    raise AdapterLoadError(source.path, "made for another attention layout (saved vs model): " + "; ".join(diffs))


def _check_base(model: nn.Module, source: _Source, target, allow_other_base: bool) -> None:
    """Refuse an adapter made for another base (architecture, or fingerprint unless allowed); warn once
    for a folder without a base record."""
    folder = str(source.path.parent.resolve())
    base = source.base
    aset = find_adapter_set(model)
    if base is not None and aset is not None and aset.merged is not None:
        base = {**base, "sha256": None}  # merged weights are not the base's: the architecture is still checked
        log.warning("%s: the model has a merged adapter, so its base weights cannot be fingerprinted; "
                    "the adapter's base is not checked", source.path.parent)
    if (base is None or not base.get("sha256")) and folder not in _UNCHECKED_WARNED:
        _UNCHECKED_WARNED.add(folder)
        what = "no base model (written before base records, or by another library)" if base is None else \
            "no fingerprint of its base (saved while merged)"
        log.warning("%s: the adapter records %s, so whether it was made for these weights cannot be checked",
                    source.path.parent, what)
    if base is None:
        return
    fault, warning = base_mismatch(base, model, model.get_submodule, target, allow_other_base)
    if fault:
        raise AdapterLoadError(source.path, fault)
    if warning:
        log.warning("%s: %s", source.path.parent, warning)


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
