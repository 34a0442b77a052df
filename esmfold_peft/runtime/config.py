"""Configurations: ml-collections files, `key.path=value` overrides, and comparing two of them.

A named configuration is a Python file with `get_config()` in a folder of configs. Overrides are
checked: an unknown key gets a "did you mean", a value of the wrong type a plain message naming the
key, what it holds and what was given.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Optional

import ml_collections as mlc

from .errors import ConfigError


def load_config_file(name_or_path: str, configs_dir: Path) -> mlc.ConfigDict:
    """A named config from `configs_dir` (e.g. 'demo') or a path to a config .py file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(configs_dir) / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in Path(configs_dir).glob("*.py") if not p.stem.startswith("_"))
        hint = difflib.get_close_matches(str(name_or_path), known, n=1)
        raise ConfigError(f"no config {name_or_path!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known: {', '.join(known)}")
    spec = importlib.util.spec_from_file_location(f"esmfold_peft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        cfg = module.get_config()
    except Exception as exc:  # a user's config file is code: report its fault in one line
        raise ConfigError(f"{path}: cannot build the config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(cfg, mlc.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(cfg).__name__}, not an ml_collections ConfigDict")
    cfg.name = cfg.get("name", path.stem) if cfg.get("name") not in (None, "base") else path.stem
    return cfg


def parse_value(text: str) -> Any:
    """A Python literal if `text` is one, true/false/none in any case, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {int: "an integer", float: "a number", str: "a string", tuple: "a tuple",
            list: "a list"}.get(type(value), type(value).__name__)


def coerce(key: str, old: Any, value: Any, text: str) -> Any:
    """`value` made to fit the type `old` has, or a ConfigError saying why it cannot."""
    if old is None or isinstance(old, mlc.ConfigDict):
        if isinstance(old, mlc.ConfigDict):
            raise ConfigError(f"{key} is a section, not a value; set one of its keys: "
                              f"{', '.join(sorted(old.keys()))}")
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif isinstance(old, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(old, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(old, str):
        return text
    elif isinstance(old, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(old)(value)
    else:
        return value
    raise ConfigError(f"{key} must be {_kind(old)} (it is {old!r}), got {text!r}")


def lookup(cfg: mlc.ConfigDict, key: str) -> tuple[mlc.ConfigDict, str]:
    """(the section holding `key`, its last part); unknown keys get a 'did you mean'."""
    parts = key.strip().split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            here = ".".join(parts[:depth])
            options = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []
            full = [f"{here}.{o}" if here else o for o in options]
            hint = difflib.get_close_matches(key, flat_keys(cfg), n=1, cutoff=0.6) or \
                difflib.get_close_matches(part, options, n=1)
            message = f"unknown config key {key!r}"
            if hint:
                suggestion = hint[0] if "." in hint[0] or not here else f"{here}.{hint[0]}"
                message += f" (did you mean {suggestion!r}?)"
            elif full:
                message += f"; keys here: {', '.join(full)}"
            raise ConfigError(message)
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def apply_overrides(cfg: mlc.ConfigDict, overrides: Optional[Iterable[str]]) -> mlc.ConfigDict:
    """Apply `key.path=value` strings in order; every fault is a ConfigError naming the key."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        key = key.strip()
        node, leaf = lookup(cfg, key)
        value = coerce(key, node[leaf], parse_value(text), text)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as exc:  # ml_collections' own type lock, as a last guard
            raise ConfigError(f"{key}: cannot take {text!r}") from exc
    return cfg


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} for a nested dict / ConfigDict."""
    if isinstance(data, mlc.ConfigDict):
        data = data.to_dict()
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, (dict, mlc.ConfigDict)) else {key: v})
    return out


def flat_keys(cfg: mlc.ConfigDict) -> list[str]:
    return list(flatten(cfg))


def differences(stored: Any, requested: Any, sections: Optional[Iterable[str]] = None) -> list[tuple[str, Any, Any]]:
    """(key, stored value, requested value) for every leaf that differs, within `sections` if given."""
    a, b = flatten(stored), flatten(requested)
    keys = sorted(set(a) | set(b))
    if sections is not None:
        prefixes = tuple(sections)
        keys = [k for k in keys if any(k == p or k.startswith(p + ".") for p in prefixes)]
    missing = object()
    out = []
    for k in keys:
        x, y = a.get(k, missing), b.get(k, missing)
        if _normal(x) != _normal(y):
            out.append((k, None if x is missing else x, None if y is missing else y))
    return out


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def describe_differences(diffs: list[tuple[str, Any, Any]], limit: int = 12) -> str:
    shown = [f"{k}: run has {a!r}, asked {b!r}" for k, a, b in diffs[:limit]]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more
