"""Writing fair-esm's ESMFold format: a model of ours (a trained run, its trunk adapter merged) as a file that
fair-esm's `ESMFold` and our `load_esmfold_checkpoint` read, for fair-esm users and as a `model.init_from`
(`scripts/export_esmfold.py`). The format is described in `esmfold_read`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import ml_collections as mlc
import torch

from ...adapters import get_adapter_set, has_adapters, is_adapter_param
from ...runtime.artifacts import torch_save
from ...runtime.errors import UserError
from ..model.esmfold import AdaptedESMFold
from .confidence import RECORD_KEY, file_record, model_heads
from .esmfold_read import ESM_TYPES, PathLike

log = logging.getLogger(__name__)

# ESM-2 sizes: width by the size in a fair-esm name (esm2_t<layers>_<size>_UR50D...)
_ESM2_WIDTHS = {"8M": 320, "35M": 480, "150M": 640, "650M": 1280, "3B": 2560, "15B": 5120}
# the esm_type a shape alone stands for: the publicly listed ESM-2 of that size
_ESM_TYPE_BY_SIZE = {"8M": "esm2_8M_270K", "35M": "esm2_35M_270K", "150M": "esm2_150M_270K", "650M": "esm2_650M",
                     "3B": "esm2_3B", "15B": "esm2_15B"}


def _esm2_shape(fair_esm_name: str) -> Optional[tuple[int, int]]:
    m = re.match(r"esm2_t(\d+)_(\d+[MB])_", fair_esm_name)
    return (int(m.group(1)), _ESM2_WIDTHS[m.group(2)]) if m and m.group(2) in _ESM2_WIDTHS else None


def esm_type_for(lm, lm_name: str = "") -> str:
    """fair-esm's `esm_type` for a language model: the one naming `lm_name` when its shape is `lm`'s,
    else the public ESM-2 of `lm`'s depth and width; a `UserError` when no ESM-2 has that shape."""
    shape = (lm.num_layers, lm.embed_dim)
    for esm_type, name in ESM_TYPES.items():
        if name == lm_name and _esm2_shape(name) == shape:
            return esm_type
    for size, esm_type in _ESM_TYPE_BY_SIZE.items():
        if _esm2_shape(ESM_TYPES[esm_type]) == shape:
            return esm_type
    raise UserError(f"the language model ({lm.num_layers} layers x {lm.embed_dim}) has the shape of no ESM-2 that "
                    f"fair-esm names; give the esm_type to write ({', '.join(ESM_TYPES)})")


def esmfold_file_config(trunk: Mapping, lddt_head_hid_dim: int, esm_type: str) -> dict:
    """cfg["model"] as esmfold_3B_v1.pt lays it out, built from fair-esm's own dataclasses."""
    from esm.esmfold.v1.trunk import FoldingTrunkConfig, StructureModuleConfig

    fields = dict(trunk)
    sm = StructureModuleConfig(**dict(fields.pop("structure_module")))
    trunk_cfg = dataclasses.asdict(FoldingTrunkConfig(**fields, structure_module=sm))
    return {"_name": "ESMFoldConfig", "esm_type": esm_type, "fp16_esm": True, "use_esm_attn_map": False,
            "esm_ablate_pairwise": False, "esm_ablate_sequence": False, "esm_input_dropout": 0, "trunk": trunk_cfg,
            "embed_aa": True, "bypass_lm": False, "lddt_head_hid_dim": int(lddt_head_hid_dim)}


@contextlib.contextmanager
def _adapters_merged(part: torch.nn.Module):
    """`part` with its active adapter merged into its weights; afterwards the weights are restored exactly
    (not by subtracting ΔW again, which would round) and the adapter is unmerged. No-op without an adapter."""
    if not has_adapters(part) or get_adapter_set(part).merged is not None:
        yield
        return
    aset = get_adapter_set(part)
    linears = {layout.linear_path(layer, relative) for layout in aset.layouts for layer in range(layout.n_layers)
               for relative, _ in layout.groups()}
    saved = {path: part.get_submodule(path).weight.detach().clone() for path in linears}
    aset.merge()
    try:
        yield
    finally:
        aset.unmerge()
        with torch.no_grad():
            for path, weight in saved.items():
                part.get_submodule(path).weight.copy_(weight)


def _plain_state(module: torch.nn.Module, skip=()) -> dict:
    """A detached, contiguous copy of a state dict, without adapter tensors and keys starting with `skip`."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()
            if not is_adapter_param(k) and not k.startswith(tuple(skip))}


def _language_model_changed(model: AdaptedESMFold, cfg: mlc.ConfigDict) -> Optional[str]:
    if has_adapters(model.esm):
        return "carries an adapter"
    if cfg.adapter.method == "full":
        return "was fully trained (adapter.method=full)"
    return None


def export_esm2(lm: torch.nn.Module, path: PathLike) -> Path:
    """Write an ESM-2 (fair-esm `ESM2`, its adapter merged) as a fair-esm checkpoint (`cfg` + `encoder.*` state),
    atomically, in float32. fair-esm's own loader picks its ESM-2 code path by file name: name it esm2_*.pt."""
    path = Path(path).expanduser()
    with _adapters_merged(lm):
        state = {f"encoder.sentence_encoder.{k}": (v.float() if v.is_floating_point() else v)
                 for k, v in _plain_state(lm).items()}
    args = argparse.Namespace(encoder_layers=lm.num_layers, encoder_embed_dim=lm.embed_dim,
                              encoder_attention_heads=lm.attention_heads, token_dropout=bool(lm.token_dropout))
    torch_save({"cfg": {"model": args}, "model": state}, path)
    return path


def export_esmfold_checkpoint(model: AdaptedESMFold, cfg: mlc.ConfigDict, path: PathLike, *,
                              esm_type: Optional[str] = None, lm_out: Optional[PathLike] = None,
                              lm_name: Optional[str] = None) -> dict:
    """Write `model` as a fair-esm ESMFold checkpoint: `{"cfg": OmegaConf, "model": state dict}`, atomically.

    The file holds the trunk, embeddings and heads, with a trunk adapter merged into the trunk's
    weights, and no language model (as fair-esm's files), and a record of how its confidence heads were
    trained (`confidence.RECORD_KEY`; fair-esm ignores it): fair-esm's `ESMFold` and
    `load_esmfold_checkpoint` read it with the ESM-2 its `esm_type` names (default: derived from the
    model's LM by `esm_type_for`, its name taken from `lm_name` or `cfg.model.lm.name`). `cfg` is
    the project config the model was built from (its trunk and lddt_head_hid_dim are written). A model
    whose LM carries an adapter or was fully trained is refused unless `lm_out` names a file for
    that LM (written by `export_esm2`, adapter merged), to be given as the ESM-2 when loading. The
    model itself is left as it was. Returns what was written (path, esm_type, merged adapters, lm_out).
    """
    path = Path(path).expanduser()
    changed = _language_model_changed(model, cfg)
    if changed and lm_out is None:
        raise UserError(f"{path}: the model's language model {changed}, and a fair-esm ESMFold file holds no "
                        "language model: write that ESM-2 too (lm_out, --lm-out esm2_*.pt) and load the file with it")
    if lm_name is None:
        lm_name = str(cfg.model.lm.name)
    esm_type = esm_type or esm_type_for(model.esm, lm_name)
    if esm_type not in ESM_TYPES:
        raise UserError(f"esm_type {esm_type!r} is not one fair-esm knows ({', '.join(ESM_TYPES)})")
    trunk, hid = cfg.model.trunk.to_dict(), cfg.model.lddt_head_hid_dim
    merged = ["trunk"] if has_adapters(model.trunk) else []
    with _adapters_merged(model.trunk):
        state = _plain_state(model, skip=("esm.",))
    state["af2_to_esm"] = model.af2_to_esm.detach().cpu().clone()  # fair-esm's persistent buffer
    try:
        from omegaconf import OmegaConf
    except ImportError as exc:  # fair-esm itself needs it
        raise UserError(f"{path}: writing a fair-esm ESMFold file needs omegaconf ({exc})") from exc
    file_cfg = OmegaConf.create({"model": esmfold_file_config(trunk, hid, esm_type)})
    written_lm = None
    if lm_out is not None:
        written_lm = export_esm2(model.esm, lm_out)
        merged += ["language model"] if has_adapters(model.esm) else []
    record = file_record(model_heads(model, cfg))  # fair-esm reads "cfg" and "model" only
    torch_save({"cfg": file_cfg, "model": state, RECORD_KEY: record}, path)
    log.info("wrote %s (fair-esm ESMFold, esm_type %s%s)", path, esm_type,
             f", language model in {written_lm}" if written_lm else "")
    return {"path": str(path), "esm_type": esm_type, "adapters_merged": merged,
            "lm_out": str(written_lm) if written_lm else None, "tensors": len(state)}


def export_hf_esmfold(model: AdaptedESMFold, cfg: mlc.ConfigDict, folder: PathLike, *,
                      esm_type: Optional[str] = None, lm_name: Optional[str] = None) -> dict:
    """Write `model` as a Hugging Face `EsmForProteinFolding` folder: config.json and model.safetensors (with its
    .sha256 beside it), each replaced atomically; the folder is created if needed.

    The weights hold the whole model: the trunk, embeddings and heads (a trunk adapter merged) and the ESM-2 (an
    LM adapter merged, in transformers' `EsmModel` names), all in float32, with `fp16_esm` false in the config, so
    that `EsmForProteinFolding.from_pretrained(folder)` predicts what `model` predicts (`hf_esmfold.hf_config` and
    `hf_state`); config.json also records how the confidence heads were trained (`confidence.RECORD_KEY`, as
    the fair-esm export does; transformers keeps it as an unused attribute). `esmfold_config.esm_type` is
    `esm_type`, else the one `esm_type_for` gives for the LM's shape, else null (transformers does not read it).
    The model itself is left as it was. Returns what was written.
    """
    from ...atomic import write_json_atomic
    from ...runtime.artifacts import save_safetensors
    from ..model.lm import fair_esm_to_hf_state_dict
    from .hf_esmfold import CONFIG, hf_config, hf_state

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; a Hugging Face ESMFold is written as a folder")
    if esm_type is None:
        try:
            esm_type = esm_type_for(model.esm, str(cfg.model.lm.name) if lm_name is None else lm_name)
        except UserError:
            esm_type = None  # an ESM-2 of no public shape: transformers does not need it
    merged = [name for name, part in (("trunk", model.trunk), ("language model", model.esm)) if has_adapters(part)]
    with _adapters_merged(model.trunk), _adapters_merged(model.esm):
        fold = _plain_state(model, skip=("esm.",))
        lm = fair_esm_to_hf_state_dict(_plain_state(model.esm))
    state = hf_state(fold, lm, model.af2_to_esm.detach().cpu().clone())
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    record = file_record(model_heads(model, cfg))  # how the heads were trained (our reader reads it back)
    write_json_atomic(folder / CONFIG, hf_config(cfg.model.trunk.to_dict(), cfg.model.lddt_head_hid_dim, esm_type,
                                                 model.esm, record))
    log.info("wrote %s (Hugging Face EsmForProteinFolding%s)", folder, f", {' and '.join(merged)} adapter merged"
             if merged else "")
    return {"path": str(folder), "esm_type": esm_type, "adapters_merged": merged, "lm_out": None,
            "tensors": len(state)}
