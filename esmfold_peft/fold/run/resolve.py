"""A folding run's configuration: how it is built, stored portably, resumed and overridden.

    cfg = new_run_config("demo", ["adapter.method=lorta", "train.steps=40"])   # a new run
    cfg = resume_run_config(run_dir, ["train.steps=80"])                          # --resume, flags on top

The run directory stores the fully resolved config (α explicit, default paths filled in), with
paths inside the run or the project written as `{run}/…` and `{project}/…` so a run directory
(or the checkout) can move. On resume the stored config is the truth: flags override only what
they name, and only keys in `RESUME_FREE` may change; any other difference is refused, each key
named with its stored and requested values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc

from ...runtime.config import apply_overrides, coerce, describe_differences, differences, flatten, lookup
from ...runtime.errors import ConfigError, UserError
from ...runtime.rundir import RunDir, map_paths, project_root, resolve_path, store_path
from .config import PATH_KEYS, RESUME_FREE, USE_FREE, base_config, check_config, check_new_run, load_config, \
    resolve_alpha

SECTIONS = ("model", "adapter", "loss", "optim", "train", "data", "val")
# keys newer than the first runs: a stored config without them takes the default
ADDED_LATER = ("model.lm.sdpa", "model.lm.storage_dtype", "model.trainable", "model.init_from", "adapter.scope",
               "model.compile", "train.keep", "train.loggers", "optim.confidence_lr")


def fill_defaults(cfg: mlc.ConfigDict) -> None:
    """Defaults that depend on where things are (demo data root, cache folder, `{demo}` in the LM path), and a
    Hugging Face ESMFold folder as `model.init_from` named by its weights file (the file a run records)."""
    if cfg.data.source == "demo" and not cfg.data.root:
        cfg.data.root = str(project_root() / "data" / "demo")
    if "{demo}" in cfg.model.lm.path:
        cfg.model.lm.path = cfg.model.lm.path.replace("{demo}", cfg.data.root or str(project_root() / "data" / "demo"))
    if not cfg.data.cache_dir:
        cfg.data.cache_dir = str(project_root() / "data" / "cache" / cfg.data.source)
    if cfg.model.init_from and Path(str(cfg.model.init_from)).expanduser().is_dir():
        from .hf_esmfold import hf_folder  # a Hugging Face ESMFold folder: the run records its weights file

        cfg.model.init_from = str(hf_folder(cfg.model.init_from)[1])


def finish(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
    """Resolve what a run stores explicitly (α, default paths) and check the values."""
    resolve_alpha(cfg)
    fill_defaults(cfg)
    check_config(cfg)
    return cfg


def new_run_config(config: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    cfg = load_config(config)
    apply_overrides(cfg, overrides)
    finish(cfg)
    check_new_run(cfg)
    return cfg


def stored_form(cfg: mlc.ConfigDict, run_dir: Path) -> dict:
    """The dict written to RUN/config.json: paths inside the run or the project made relative to them."""
    return map_paths(cfg.to_dict(), PATH_KEYS, lambda v: store_path(v, Path(run_dir), project_root()))


def working_form(stored: dict, run_dir: Optional[Path]) -> mlc.ConfigDict:
    """A stored config, typed like `base_config()`, placeholders resolved against where run and project are now.

    Every value is checked against the type the key has in `base_config()`; a key it does not know
    or a value of the wrong type is a ConfigError naming the key (the file may have been edited).
    """
    resolved = map_paths(stored, PATH_KEYS, lambda v: resolve_path(v, run_dir, project_root()))
    cfg = base_config()
    given = flatten(resolved)
    missing = [k for k in flatten(cfg) if k not in given and not k.startswith(ADDED_LATER)]
    if missing:
        raise ConfigError(f"lacks the key(s) {', '.join(missing[:6])}" + (" …" if len(missing) > 6 else ""))
    for key, value in given.items():
        node, leaf = lookup(cfg, key)
        if isinstance(value, dict):  # an empty section
            continue
        node[leaf] = coerce(key, node[leaf], value, value if isinstance(value, str) else repr(value))
    return cfg


def stored_run_config(run_dir: Path) -> mlc.ConfigDict:
    """The run's config.json, typed and checked, paths resolved against where run and project are now."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run directory")
    if not run.config.exists():
        raise UserError(f"{run.path}: not a run directory (no config.json)")
    stored = run.read_config()
    for section in SECTIONS:
        if not isinstance(stored.get(section), dict):
            raise UserError(f"{run.config}: not a folding run configuration (no {section!r} section)")
    try:
        cfg = working_form(stored, run.path)
        check_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{run.config}: {exc}") from exc
    return cfg


def with_overrides(cfg: mlc.ConfigDict, overrides: Sequence[str] = (),
                   use_overrides: Optional[Sequence[str]] = None) -> mlc.ConfigDict:
    """A copy of a run's config with `key=value` overrides (their keys checked, the values by the caller);
    `use_overrides`: the key prefixes they may touch (None: any)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:  # form and key first: a typo is named as one, not as a locked key
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        lookup(cfg, item.split("=", 1)[0].strip())
    if use_overrides is not None:
        locked = [o.split("=", 1)[0].strip() for o in overrides
                  if not any(o.split("=", 1)[0].strip().startswith(k) for k in use_overrides)]
        if locked:
            raise ConfigError(f"{', '.join(locked)}: cannot be changed when using a trained run (it would not be "
                              f"the model that was trained); changeable: paths, {', '.join(USE_FREE[-4:])}")
    return apply_overrides(cfg, overrides)


def read_run_config(run_dir: Path, overrides: Sequence[str] = (),
                    use_overrides: Optional[Sequence[str]] = None) -> mlc.ConfigDict:
    """The run's config as it can be used here, with `key=value` overrides (e.g. a moved LM, a chunk size)."""
    cfg = with_overrides(stored_run_config(run_dir), overrides, use_overrides)
    if overrides:
        check_config(cfg)
    return cfg


def resume_run_config(run_dir: Path, overrides: Sequence[str] = (),
                      stored: Optional[mlc.ConfigDict] = None) -> mlc.ConfigDict:
    """The run's own config with the resume-time overrides; refused when they change what a run cannot.

    `stored`: the run's config when the caller has read it already (`stored_run_config`): read once.
    """
    stored = stored if stored is not None else stored_run_config(run_dir)
    cfg = finish(with_overrides(stored, overrides))
    refuse_locked_changes(run_dir, stored.to_dict(), cfg)
    return cfg


def check_resumable_config(run_dir: Path, cfg: mlc.ConfigDict) -> None:
    """ConfigError naming every key where `cfg` differs from the run's stored config outside `RESUME_FREE`."""
    refuse_locked_changes(run_dir, working_form(RunDir(run_dir).read_config(), Path(run_dir)).to_dict(), cfg)


def refuse_locked_changes(run_dir: Path, stored: dict, cfg: mlc.ConfigDict) -> None:
    locked = [d for d in differences(stored, cfg.to_dict())
              if not any(d[0] == k or d[0].startswith(k + ".") for k in RESUME_FREE)]
    if locked:
        raise ConfigError(f"cannot resume {run_dir} with a different configuration: "
                          f"{describe_differences(locked)} (a resumed run may change its length, cadence, device "
                          "and input paths only)")
