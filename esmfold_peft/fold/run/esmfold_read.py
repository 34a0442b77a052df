"""Starting from a pretrained ESMFold: fair-esm's checkpoint files, read safely, into our model.

fair-esm's ESMFold checkpoints (`esmfold_3B_v1.pt`, `esmfold_3B_v0.pt`,
`esmfold_structure_module_only_*`) are a pickled dict:

    {"cfg": <OmegaConf DictConfig>, "model": <state dict>}

`cfg["model"]` holds `esm_type` (which ESM-2, e.g. "esm2_3B"), `lddt_head_hid_dim`,
`use_esm_attn_map` and a few other flags, and `trunk` (fair-esm's FoldingTrunk fields, with
`structure_module`). The state dict has the trunk and heads but not the ESM-2 weights: like fair-esm,
we load the language model from its own checkpoint.

Two entry points:

  * `load_esmfold_checkpoint(path, lm=None)` -> (model, config): the model fair-esm would build
    from the file (same predictions; see `AdaptedESMFold` for the deliberate differences: float32
    LM, not detached), and the project config that describes it;
  * `init_from_checkpoint(model, cfg)`: a model built from a config (`build_model`, adapters and
    all) gets its trunk and heads from `cfg.model.init_from`, a fair-esm ESMFold file whose shapes
    match the config (a `ConfigError` names every difference otherwise).

Both also take Hugging Face's ESMFold (transformers' `EsmForProteinFolding` folder, or the weights file in
one): `hf_esmfold` reads it into the same cfg["model"] layout and state-dict names, and its ESM-2 is the
folder's own (`lm` replaces it). `model.init_from` names the weights file, since a run records the SHA-256
of one file.

The other way, a model of ours written in that format, is `esmfold_write.export_esmfold_checkpoint`
(`export_hf_esmfold` for a Hugging Face folder).

Reading is weights-only: the unpickler may build tensors and exactly the OmegaConf container
classes a config pickles (`OMEGACONF_PICKLE_CLASSES`), nothing else; a file that asks for more is
refused with the name of what it asked for.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import ml_collections as mlc
import torch

from ... import compat
from ...adapters import is_adapter_param
from ...runtime.artifacts import check_tensors, torch_load
from ...runtime.errors import ArtifactError, ConfigError
from .config import base_config, structure_module_config, trunk_config
from .confidence import read_file_record
from .hf_esmfold import hf_folder, is_hf_esmfold, read_hf_esmfold
from ..model.lm import load_language_model, looks_like_path
from ..model.esmfold import AdaptedESMFold

log = logging.getLogger(__name__)

# fair-esm's `esm_registry` (esm/esmfold/v1/esmfold.py on fair-esm's main branch): the ESM-2 each
# `esm_type` names. Note that the plain sizes up to 150M name the ESM-2 trained to 500K updates, and
# "_270K" the publicly listed models; fair-esm 2.0.0 itself always loads esm2_t36_3B_UR50D.
ESM_TYPES = {
    "esm2_8M": "esm2_t6_8M_UR50D_500K",
    "esm2_8M_270K": "esm2_t6_8M_UR50D",
    "esm2_35M": "esm2_t12_35M_UR50D_500K",
    "esm2_35M_270K": "esm2_t12_35M_UR50D",
    "esm2_150M": "esm2_t30_150M_UR50D_500K",
    "esm2_150M_270K": "esm2_t30_150M_UR50D_270K",
    "esm2_650M": "esm2_t33_650M_UR50D",
    "esm2_650M_270K": "esm2_t33_650M_270K_UR50D",
    "esm2_3B": "esm2_t36_3B_UR50D",
    "esm2_3B_270K": "esm2_t36_3B_UR50D_500K",
    "esm2_15B": "esm2_t48_15B_UR50D",
}
DEFAULT_ESM_TYPE = "esm2_3B"  # what fair-esm 2.0.0 loads whatever the file says

# trunk fields that define the computation the weights were trained for (the others, dropout,
# layer_drop, cpu_grad_checkpoint, max_recycles and chunk_size, are how one runs it)
TRUNK_ARCHITECTURE = ("num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width",
                      "pairwise_head_width", "position_bins")
STRUCTURE_MODULE_ARCHITECTURE = ("c_s", "c_z", "c_ipa", "c_resnet", "no_heads_ipa", "no_qk_points", "no_v_points",
                                 "no_blocks", "no_transition_layers", "no_resnet_blocks", "no_angles",
                                 "trans_scale_factor", "epsilon", "inf")
# ESMFoldConfig flags that fair-esm's public ESMFold does not implement: a file that sets them to
# anything but these values was trained for a computation neither fair-esm nor we can run
_UNSUPPORTED_FLAGS = {"use_esm_attn_map": False, "bypass_lm": False, "embed_aa": True, "esm_ablate_sequence": False}
# fair-esm registers `af2_to_esm` as a persistent buffer, so its files carry it; ours is rebuilt from the
# alphabet (and checked against the file's)
_FAIR_ESM_BUFFERS = ("af2_to_esm",)
# openfold's residue-constant tables: buffers it rebuilds itself (not saved by openfold 0.0.1, which registers
# them as non-persistent); a file written with them is read without them
_OPENFOLD_CONSTANTS = tuple(f"trunk.structure_module.{n}" for n in ("default_frames", "group_idx", "atom_mask",
                                                                     "lit_positions"))
_LIST_LIMIT = 8

PathLike = Union[str, Path]


def omegaconf_pickle_classes() -> list:
    """What an OmegaConf config's pickle needs, and nothing more (found by trying: DictConfig and
    ListConfig, their metadata, untyped value nodes, and the plain types the metadata names)."""
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode
    except ImportError:
        return []
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list, int,
            collections.defaultdict]


def _shorten(names, limit: int = _LIST_LIMIT) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f" … ({len(names)} in all)" if len(names) > limit else "")


def _unpickle(path: Path) -> object:
    classes = omegaconf_pickle_classes()
    try:
        with torch.serialization.safe_globals(classes):
            return torch_load(path)
    except ArtifactError as exc:
        cause = str(exc.__cause__ or "")
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", cause)
        if m:
            what = m.group(1)
            if what.startswith("omegaconf.") and not classes:
                raise ArtifactError(path, "its config is an OmegaConf object: install omegaconf to read it") from exc
            raise ArtifactError(path, f"its pickle asks for {what}, which a fair-esm ESMFold checkpoint does not "
                                      "need; refused (only tensors and OmegaConf containers are unpickled)") from exc
        m = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", cause, re.S)
        if m and " ".join(m.group(1).split()):  # torch's advice to drop weights_only is not for a user's file
            raise ArtifactError(path, f"damaged or not a PyTorch checkpoint ({' '.join(m.group(1).split())})") \
                from exc
        raise


def _plain(value, path: Path, what: str):
    """An OmegaConf node, Namespace or mapping as plain Python containers."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    except Exception as exc:  # interpolation and validation errors of a damaged config
        raise ArtifactError(path, f"its {what} cannot be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(value, argparse.Namespace):
        return vars(value)
    return value


def read_esmfold_checkpoint(path: PathLike) -> tuple[dict, dict]:
    """(cfg["model"] as plain dicts, state dict) of a fair-esm ESMFold file, checked.

    Missing, damaged or foreign files, and files whose pickle asks for anything beyond tensors and
    OmegaConf containers, raise an `ArtifactError` naming the file.
    """
    model_cfg, state, _ = read_esmfold_file(path)
    return model_cfg, state


def read_esmfold_file(path: PathLike) -> tuple[dict, dict, Optional[dict]]:
    """`read_esmfold_checkpoint`'s two, and the record of how the file's confidence heads were trained (None for
    files without one, as Meta's; `confidence.read_file_record`).

    A directory, or a weights file with config.json beside it, is a Hugging Face `EsmForProteinFolding` folder
    (`hf_esmfold.read_hf_esmfold`: cfg["model"] in fair-esm's layout, the folding state in our names, and the
    record config.json holds, None in Meta's)."""
    path = Path(path).expanduser()
    if is_hf_esmfold(path):
        model_cfg, state, record, _ = read_hf_esmfold(path)
        return model_cfg, state, record
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise ArtifactError(path, f"not a fair-esm ESMFold checkpoint (a {type(data).__name__}, expected a dict "
                                  "with 'cfg' and 'model')")
    for key in ("cfg", "model"):
        if key not in data:
            raise ArtifactError(path, f"not a fair-esm ESMFold checkpoint (no {key!r} entry; it has "
                                      f"{_shorten(map(str, data)) or 'no entries'})")
    cfg = _plain(data["cfg"], path, "'cfg' entry")
    model_cfg = _plain(cfg.get("model"), path, "cfg['model']") if isinstance(cfg, Mapping) else None
    if not isinstance(model_cfg, Mapping):
        raise ArtifactError(path, "not a fair-esm ESMFold checkpoint (its 'cfg' has no 'model' section)")
    if not isinstance(model_cfg.get("trunk"), Mapping):
        if "encoder_layers" in model_cfg:
            raise ArtifactError(path, "is an ESM-2 language model checkpoint, not an ESMFold one (give it as the "
                                      "language model)")
        raise ArtifactError(path, "not a fair-esm ESMFold checkpoint (cfg['model'] has no 'trunk' section)")
    state = data["model"]
    if not isinstance(state, dict):
        raise ArtifactError(path, f"not a fair-esm ESMFold checkpoint ('model' is a {type(state).__name__}, "
                                  "not a state dict)")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise ArtifactError(path, f"'model' has non-string keys ({_shorten(map(repr, bad))})")
    check_tensors(state, path, allow_integer=_FAIR_ESM_BUFFERS + _OPENFOLD_CONSTANTS)
    return dict(model_cfg), state, read_file_record(data, path)


def _typed_like(default, value, path: Path, key: str):
    """`value` with the type of the project's default for `key` (files store 0 for 0.0)."""
    if default is None or value is None:
        return value
    kind = type(default)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float, bool)):
        raise ArtifactError(path, f"cfg['model'] trunk field {key!r} is {value!r}; expected {kind.__name__}")
    if kind is int and float(value) != int(value):
        raise ArtifactError(path, f"cfg['model'] trunk field {key!r} is {value!r}; expected an integer")
    return kind(value)


def trunk_from_checkpoint(model_cfg: Mapping, path: PathLike) -> dict:
    """The project's `model.trunk` for a checkpoint's cfg["model"]["trunk"] (fair-esm's defaults fill gaps,
    as its dataclasses do); unknown fields are refused."""
    path = Path(path)
    raw = dict(model_cfg["trunk"])
    raw.pop("_name", None)
    sm_raw = raw.pop("structure_module", None)
    sm_raw = {} if sm_raw is None else dict(sm_raw)
    sm_raw.pop("_name", None)
    trunk, sm = trunk_config(), structure_module_config()
    trunk.pop("structure_module")
    unknown = sorted(set(raw) - set(trunk)) + [f"structure_module.{k}" for k in sorted(set(sm_raw) - set(sm))]
    if unknown:
        raise ArtifactError(path, f"cfg['model']['trunk'] has fields fair-esm's FoldingTrunk does not know: "
                                  f"{_shorten(unknown)}")
    trunk.update({k: _typed_like(trunk[k], v, path, k) for k, v in raw.items()})
    sm.update({k: _typed_like(sm[k], v, path, f"structure_module.{k}") for k, v in sm_raw.items()})
    trunk["structure_module"] = sm
    return trunk


def _lm_config(lm, esm_type: str, path: Path) -> mlc.ConfigDict:
    lm_cfg = mlc.ConfigDict(base_config().model.lm.to_dict())
    if lm is None:
        if esm_type not in ESM_TYPES:
            raise ArtifactError(path, f"esm_type {esm_type!r} names no ESM-2 that fair-esm knows "
                                      f"({', '.join(ESM_TYPES)}); give the language model explicitly")
        lm_cfg.name, lm_cfg.path = ESM_TYPES[esm_type], ""
    elif isinstance(lm, Mapping):
        for key, value in lm.items():
            lm_cfg[key] = value
    else:
        text = str(lm)
        if isinstance(lm, Path) or looks_like_path(text) or Path(text).expanduser().exists():
            lm_cfg.name, lm_cfg.path = "", text
        else:
            lm_cfg.name, lm_cfg.path = text, ""
    return lm_cfg


def _check_flags(model_cfg: Mapping, path: Path) -> None:
    odd = [f"{k}={model_cfg[k]!r}" for k, ok in _UNSUPPORTED_FLAGS.items() if k in model_cfg and
           bool(model_cfg[k]) != ok]
    if odd:
        raise ArtifactError(path, f"cfg['model'] sets {', '.join(odd)}, which fair-esm's ESMFold does not "
                                  "implement (its predictions would not be the ones it was trained for)")


def _check_language_model(state: Mapping, lm, path: Path, esm_type: Optional[str], lm_description: str) -> None:
    """The checkpoint's esm_s_combine/esm_s_mlp were trained on an ESM-2 of this depth and width."""
    combine, norm = state.get("esm_s_combine"), state.get("esm_s_mlp.0.weight")
    layers = None if combine is None else combine.shape[0] - 1
    width = None if norm is None else norm.shape[0]
    if (layers is not None and layers != lm.num_layers) or (width is not None and width != lm.embed_dim):
        expected = f" ({esm_type}: {ESM_TYPES[esm_type]})" if esm_type in ESM_TYPES else ""
        raise ArtifactError(path, f"its trunk reads an ESM-2 of {layers} layers x {width}{expected}, but the "
                                  f"language model ({lm_description}) has {lm.num_layers} layers x {lm.embed_dim}")


def load_esmfold_state(model: AdaptedESMFold, state: Mapping, path: PathLike) -> None:
    """Load a fair-esm ESMFold state dict into `model`, strictly.

    The ESM-2's keys (`esm.*`) may be absent (fair-esm's files have none) and adapter tensors
    (`*.peft.*`) always are; every other key must be present with its shape, and no key may be
    unknown. IPA point projections are renamed to the installed openfold's names. An `ArtifactError`
    lists what does not fit.
    """
    path = Path(path)
    own = model.state_dict()
    state = dict(state)
    for name in _FAIR_ESM_BUFFERS:
        value = state.pop(name, None)
        mine = getattr(model, name, None)
        if value is not None and mine is not None and (value.shape != mine.shape or
                                                       not torch.equal(value.to(mine.device), mine)):
            raise ArtifactError(path, f"its {name} buffer differs from the one our language model's alphabet gives "
                                      "(an ESM-2 with another vocabulary?)")
    for name in _OPENFOLD_CONSTANTS:
        if name not in own:
            state.pop(name, None)
    state = compat.match_ipa_point_names(state, own)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith("esm.") and not is_adapter_param(k))
    if unexpected or missing:
        parts = ([f"unexpected keys: {_shorten(unexpected)}"] if unexpected else []) + \
                ([f"missing keys: {_shorten(missing)}"] if missing else [])
        raise ArtifactError(path, "does not fit the ESMFold model built from its config; " + "; ".join(parts))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
    if shapes:
        raise ArtifactError(path, f"tensor shapes differ from the model's (file vs model): {_shorten(shapes)}")
    model.load_state_dict(state, strict=False)


def config_from_checkpoint(path: PathLike, lm=None, model_cfg: Optional[Mapping] = None) -> mlc.ConfigDict:
    """The project config of the model in a fair-esm ESMFold file (frozen LM, no adapter).

    `lm` overrides the ESM-2 that `esm_type` names (a Hugging Face ESMFold folder: the folder's own): a fair-esm
    name, a path (fair-esm .pt or Hugging Face ESM directory), or a mapping of `model.lm` keys.
    `model.init_from` is the file itself (a Hugging Face folder's weights file), so
    `build_model(cfg)` followed by `init_from_checkpoint(model, cfg)` rebuilds the same model.
    """
    path = Path(path).expanduser()
    if model_cfg is None:
        model_cfg, _ = read_esmfold_checkpoint(path)
    _check_flags(model_cfg, path)
    esm_type = model_cfg.get("esm_type") or DEFAULT_ESM_TYPE
    cfg = base_config()
    cfg.name = f"esmfold-{path.stem}"
    if is_hf_esmfold(path):  # a Hugging Face folder: its own ESM-2 unless `lm` names another; the run records a file
        folder, path = hf_folder(path)
        cfg.name = f"esmfold-{folder.name}"
        lm = {"path": str(folder), "name": ""} if lm is None else lm
    cfg.model.lm = _lm_config(lm, str(esm_type), path)
    cfg.model.trunk = trunk_from_checkpoint(model_cfg, path)
    hid = model_cfg.get("lddt_head_hid_dim", 128)
    if isinstance(hid, bool) or not isinstance(hid, int) or hid < 1:
        raise ArtifactError(path, f"cfg['model']['lddt_head_hid_dim'] is {hid!r}; expected a positive integer")
    cfg.model.lddt_head_hid_dim = hid
    cfg.model.init_from = str(path)
    cfg.adapter.method = "none"
    return cfg


def load_esmfold_checkpoint(path: PathLike, lm=None, device: Union[str, torch.device] = "cpu"
                            ) -> tuple[AdaptedESMFold, mlc.ConfigDict]:
    """(model in eval mode on `device`, its project config) from a fair-esm ESMFold checkpoint or a Hugging Face
    ESMFold folder (then the LM is the folder's unless `lm` is given; it predicts what transformers'
    `EsmForProteinFolding` predicts, its LM in float32).

    The model predicts what fair-esm's `ESMFold` predicts from the same file (with its LM in float32,
    as fair-esm's `esm-fold --cpu-only` runs it; on GPU fair-esm runs the LM in float16). The LM is
    frozen. `lm` as in `config_from_checkpoint`; offline, give a path.
    """
    path = Path(path).expanduser()
    model_cfg, state, record = read_esmfold_file(path)
    cfg = config_from_checkpoint(path, lm, model_cfg)
    esm_lm, alphabet, description = load_language_model(cfg.model.lm)
    _check_language_model(state, esm_lm, path, model_cfg.get("esm_type") or DEFAULT_ESM_TYPE, description)
    model = AdaptedESMFold(esm_lm, alphabet, cfg.model.trunk, lddt_head_hid_dim=cfg.model.lddt_head_hid_dim)
    model.lm_description = description
    load_esmfold_state(model, state, path)
    model.confidence_record = record  # how the file's pLDDT and pTM heads were trained (None: Meta's, per atom)
    esm_lm.requires_grad_(False)
    log.info("ESMFold from %s with language model %s", path, description)
    return model.to(device).eval(), cfg


def _differences(ours: Mapping, theirs: Mapping, keys, prefix: str) -> list[str]:
    return [f"{prefix}{k}={ours.get(k)!r} (checkpoint: {theirs.get(k)!r})" for k in keys
            if ours.get(k) != theirs.get(k)]


def init_from_checkpoint(model: AdaptedESMFold, cfg: mlc.ConfigDict) -> None:
    """Give a freshly built model the trunk and heads of `cfg.model.init_from` (a fair-esm ESMFold file, or the
    weights file of a Hugging Face ESMFold folder; a folder is refused with that file's name, as a run records
    the SHA-256 of one file).

    The config must describe the checkpoint's architecture (trunk and structure-module shapes,
    `lddt_head_hid_dim`, and an LM of the depth and width the trunk was trained on); otherwise a
    `ConfigError` names every difference. The LM and any adapters are left as they are (the file's
    `esm.*` tensors, if it has any, are loaded too). Does nothing when `init_from` is empty.
    """
    source = cfg.model.get("init_from")
    if not source:
        return
    path = Path(str(source)).expanduser()
    if path.is_dir():  # a run records the SHA-256 of one file (run.checkpoint.PretrainedRecord)
        raise ConfigError(f"model.init_from={path}: a folder; name the Hugging Face ESMFold's weights file in it "
                          f"(model.init_from={hf_folder(path)[1]})")
    model_cfg, state, record = read_esmfold_file(path)
    _check_flags(model_cfg, path)
    theirs = trunk_from_checkpoint(model_cfg, path)
    ours = cfg.model.trunk.to_dict()
    diffs = _differences(ours, theirs, TRUNK_ARCHITECTURE, "model.trunk.")
    diffs += _differences(dict(ours["structure_module"]), theirs["structure_module"], STRUCTURE_MODULE_ARCHITECTURE,
                          "model.trunk.structure_module.")
    hid = model_cfg.get("lddt_head_hid_dim", 128)
    if cfg.model.lddt_head_hid_dim != hid:
        diffs.append(f"model.lddt_head_hid_dim={cfg.model.lddt_head_hid_dim!r} (checkpoint: {hid!r})")
    if diffs:
        raise ConfigError(f"model.init_from={path}: the config does not describe this checkpoint's model: "
                          + "; ".join(diffs))
    esm_type = model_cfg.get("esm_type") or DEFAULT_ESM_TYPE
    description = getattr(model, "lm_description", "model.lm")
    try:
        _check_language_model(state, model.esm, path, esm_type, description)
    except ArtifactError as exc:
        raise ConfigError(f"model.init_from={path}: set model.lm to the ESM-2 it was trained with; {exc.fault}") \
            from exc
    load_esmfold_state(model, state, path)
    model.confidence_record = record  # the heads' provenance travels with them (run.confidence)
    log.info("trunk and heads initialised from %s", path)
