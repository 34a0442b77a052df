"""Building or loading the ESM-2 language model (fair-esm's `ESM2`).

Sources, in the order they are tried for a config `lm`:
  * `lm.path` a local file or directory: a fair-esm `.pt` checkpoint, or a Hugging Face ESM
    checkpoint (a directory with `config.json` + `pytorch_model.bin`/`model.safetensors`/shards, or the
    weights file alone), converted to fair-esm names; an `EsmForProteinFolding` folder gives its ESM-2.
    config.json's fields that change the forward are followed (`token_dropout`, `layer_norm_eps`) or
    refused by name (`hf_esm_settings`);
  * `lm.name` a fair-esm model name, through fair-esm's own loader (torch hub cache, or a
    download where the network allows it);
  * `lm.random_init=True`: random weights for the named architecture, with a loud warning.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ... import compat  # noqa: F401  (torch.load allow-list for fair-esm checkpoints)
from ...adapters import is_adapter_param
from ...adapters.layouts import architecture
from .esm_attention import enable_sdpa  # SDPA attention switch
from ...runtime.artifacts import (check_tensors, load_safetensors, read_json, require_file, torch_load,
                                  verify_checksum)
from ...runtime.errors import ArtifactError, UserError

log = logging.getLogger(__name__)


class LanguageModelError(UserError):
    pass


# Hugging Face ESM -> fair-esm ESM2 parameter names (per layer, then global)
_HF_LAYER = [
    (r"attention\.self\.query\.", "self_attn.q_proj."),
    (r"attention\.self\.key\.", "self_attn.k_proj."),
    (r"attention\.self\.value\.", "self_attn.v_proj."),
    (r"attention\.output\.dense\.", "self_attn.out_proj."),
    (r"attention\.LayerNorm\.", "self_attn_layer_norm."),
    (r"intermediate\.dense\.", "fc1."),
    (r"output\.dense\.", "fc2."),
    (r"LayerNorm\.", "final_layer_norm."),
]
_HF_GLOBAL = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
}
_HF_LM_HEAD = {"lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
               "lm_head.layer_norm.bias", "lm_head.bias"}
# present in HF checkpoints but without a counterpart in fair-esm's ESM2 (rotary models)
# rotary inv_freq buffers are recomputed by fair-esm (and transformers 5 saves one shared `layer.*` copy)
_HF_IGNORED = re.compile(r"^(embeddings\.position_ids|embeddings\.position_embeddings\.weight|classifier\..*"
                         r"|pooler\..*|(encoder\.layer\.[^.]+\.attention\.self\.)?rotary_embeddings\.inv_freq)$")
# LayerNorm parameters saved under their legacy names (transformers 5 writes these)
_LEGACY_NORM = re.compile(r"(LayerNorm|layer_norm|emb_layer_norm_after)\.(gamma|beta)$")


def convert_hf_esm_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], list]:
    """Rename a Hugging Face `EsmModel`/`EsmFor*` state dict to fair-esm `ESM2` names.

    Returns (converted, ignored_keys). Unknown keys raise, so a wrong file is never half-read.
    """
    out, ignored, unknown = {}, [], []
    for key, value in sd.items():
        k = key[len("esm."):] if key.startswith("esm.") else key
        k = _LEGACY_NORM.sub(lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", k)
        if k in _HF_LM_HEAD:
            out[k] = value
            continue
        if _HF_IGNORED.match(k):
            ignored.append(key)
            continue
        if k in _HF_GLOBAL:
            out[_HF_GLOBAL[k]] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(2)
            for pattern, repl in _HF_LAYER:
                if re.match(pattern, rest):
                    out[f"layers.{m.group(1)}.{re.sub('^' + pattern, repl, rest)}"] = value
                    break
            else:
                unknown.append(key)
            continue
        unknown.append(key)
    if unknown:
        raise LanguageModelError(f"not a Hugging Face ESM checkpoint? unknown keys: {', '.join(unknown[:6])}")
    return out, ignored


def fair_esm_to_hf_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A fair-esm `ESM2` state dict in transformers' `EsmModel` names (the inverse of `convert_hf_esm_state_dict`).

    The masked-LM head (`lm_head.*`, not part of an `EsmModel`) is left out, and the rotary frequencies are
    written once as `rotary_embeddings.inv_freq`, where transformers 5 keeps them; adapter tensors must be merged
    or removed first (a `*.peft.*` key is refused)."""
    to_hf = {v: k for k, v in _HF_GLOBAL.items()}
    out = {}
    for key, value in sd.items():
        if key.startswith("lm_head."):
            continue
        if key in to_hf:
            out[to_hf[key]] = value
            continue
        m = re.match(r"layers\.(\d+)\.(.*)$", key)
        if m and m.group(2) == "self_attn.rot_emb.inv_freq":
            out.setdefault("rotary_embeddings.inv_freq", value)
            continue
        for hf_pattern, ours in _HF_LAYER:
            if m and m.group(2).startswith(ours):
                hf = hf_pattern.replace("\\", "")
                out[f"encoder.layer.{m.group(1)}.{hf}{m.group(2)[len(ours):]}"] = value
                break
        else:
            raise LanguageModelError(f"no transformers ESM name for the language model's {key}")
    return out


def _infer_shape(sd: Dict[str, torch.Tensor], heads: Optional[int]) -> Tuple[int, int, int]:
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    dim = sd["embed_tokens.weight"].shape[1]
    if heads is None:
        inv = sd.get("layers.0.self_attn.rot_emb.inv_freq")
        if inv is None:
            raise LanguageModelError("cannot infer the number of attention heads; give model.lm.heads")
        heads = dim // (2 * inv.shape[0])  # rotary inv_freq has head_dim/2 entries
    return n_layers, dim, heads


def _build_esm2(n_layers: int, dim: int, heads: int, token_dropout: bool = True):
    import esm

    return esm.model.esm2.ESM2(num_layers=n_layers, embed_dim=dim, attention_heads=heads,
                               alphabet="ESM-1b", token_dropout=token_dropout)


# --- Hugging Face folders: weights files (single or sharded) and the config fields that change the forward ---
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded weights: their weight_map
ROPE_THETA = 10000.0  # fair-esm's RotaryEmbedding base


def hf_weights_file(directory: Path) -> Path:
    """The weights of a Hugging Face folder: model.safetensors, pytorch_model.bin, or a shard index (*.index.json)."""
    for name in HF_WEIGHTS + HF_INDEXES:
        if (directory / name).is_file():
            return directory / name
    raise LanguageModelError(f"{directory}: no weights file (model.safetensors, pytorch_model.bin or a sharded "
                             f"{HF_INDEXES[0]})")


def _read_safetensors_part(weights: Path, keep) -> dict:
    """The tensors of a .safetensors file whose names `keep` accepts, read alone (not the whole file)."""
    from safetensors import safe_open

    require_file(weights, "weight file")
    verify_checksum(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as exc:  # safetensors raises its own error types, and OSError/ValueError
        raise ArtifactError(weights, f"damaged or not a safetensors file ({type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())[:160]})") from exc


def _read_weights_file(weights: Path, keep=None) -> dict:
    if keep is not None and weights.suffix == ".safetensors":
        return _read_safetensors_part(weights, keep)
    raw = load_safetensors(weights, check_values=False) if weights.suffix == ".safetensors" else torch_load(weights)
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in raw.items()):
        raise ArtifactError(weights, "not a state dict (a mapping of names to tensors)")
    return raw if keep is None else {k: v for k, v in raw.items() if keep(k)}


def read_hf_weights(weights: Path, keep=None) -> Dict[str, torch.Tensor]:
    """The state dict in a Hugging Face weights file, or in the shards a `*.index.json` names (its weight_map);
    with `keep`, only the tensors whose names it accepts (safetensors files then read only those)."""
    weights = Path(weights)
    if not weights.name.endswith(".index.json"):
        return _read_weights_file(weights, keep)
    index = read_json(weights, dict, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values()):
        raise ArtifactError(weights, "not a shard index (no weight_map of tensor names to shard files beside it)")
    keep = keep or (lambda key: True)
    state = {}
    for shard in sorted({f for k, f in weight_map.items() if keep(k)}):
        state.update(_read_weights_file(weights.parent / shard, keep))
    absent = sorted(k for k in weight_map if keep(k) and k not in state)
    if absent:
        raise ArtifactError(weights, f"its shards lack tensors the index names: {', '.join(absent[:6])}")
    return state


def _hf_vocabulary_checks(config: dict, path: Path, alphabet) -> None:
    tokens = list(alphabet.all_toks)
    if config.get("vocab_size") not in (None, len(tokens)):
        raise LanguageModelError(f"{path}: config.json vocab_size is {config['vocab_size']}; fair-esm's ESM-2 "
                                 f"alphabet has {len(tokens)} tokens")
    if config.get("vocab_list") is not None and list(config["vocab_list"]) != tokens:
        raise LanguageModelError(f"{path}: config.json vocab_list is not the ESM-2 vocabulary (fair-esm's ESM-1b "
                                 "alphabet, in its order); another vocabulary is not supported")
    vocab_txt = path / "vocab.txt" if path.is_dir() else path.parent / "vocab.txt"
    if vocab_txt.is_file() and vocab_txt.read_text().split() != tokens:
        raise LanguageModelError(f"{vocab_txt}: not the ESM-2 vocabulary (fair-esm's ESM-1b alphabet, in its order)")
    if config.get("pad_token_id") not in (None, alphabet.padding_idx):
        raise LanguageModelError(f"{path}: config.json pad_token_id is {config['pad_token_id']}; ESM-2's padding "
                                 f"token is {alphabet.padding_idx}")
    if config.get("token_dropout") and config.get("mask_token_id") != alphabet.mask_idx:
        raise LanguageModelError(f"{path}: config.json mask_token_id is {config.get('mask_token_id')} with "
                                 f"token_dropout; ESM-2's mask token is {alphabet.mask_idx}")


def hf_esm_settings(config: dict, raw: Dict[str, torch.Tensor], path: Path) -> dict:
    """What of a Hugging Face ESM config.json changes the forward, as fair-esm ESM2 settings
    (`token_dropout`, `layer_norm_eps`); fields fair-esm's ESM2 cannot honour are refused by name.

    Honoured: token_dropout (transformers' default, False, when config.json omits it; a weights file without
    config.json is taken as ESM-2's True), layer_norm_eps (every LayerNorm's eps). Refused: position_embedding_type
    other than rotary (inferred from absolute position weights when the config omits it), emb_layer_norm_before, rope_theta other
    than 10000, is_decoder and add_cross_attention, and any vocabulary but ESM-2's. hidden_act is not read
    (transformers' ESM always uses erf GELU, as fair-esm).
    """
    import esm

    if not config:
        return {"token_dropout": True, "layer_norm_eps": 1e-5}
    absolute = "embeddings.position_embeddings.weight" in {k[len("esm."):] if k.startswith("esm.") else k
                                                            for k in raw}
    # older transformers saved a (then unused) position-embedding table whatever the type: the config decides,
    # the weights only when it says nothing
    position = config.get("position_embedding_type") or ("absolute" if absolute else "rotary")
    refused = [(name, value) for name, value, ok in (
        ("position_embedding_type", position, position == "rotary"),
        ("emb_layer_norm_before", config.get("emb_layer_norm_before"), not config.get("emb_layer_norm_before")),
        ("rope_theta", config.get("rope_theta"), float(config.get("rope_theta") or ROPE_THETA) == ROPE_THETA),
        ("is_decoder", config.get("is_decoder"), not config.get("is_decoder")),
        ("add_cross_attention", config.get("add_cross_attention"), not config.get("add_cross_attention")))
        if not ok]
    if refused:
        name, value = refused[0]
        raise LanguageModelError(f"{path}: config.json {name}={value!r} is not supported (fair-esm's ESM2, which "
                                 "runs it here, has rotary positions with base 10000, no embedding LayerNorm and "
                                 "no decoder)")
    _hf_vocabulary_checks(config, path, esm.data.Alphabet.from_architecture("ESM-1b"))
    eps = config.get("layer_norm_eps")
    return {"token_dropout": bool(config.get("token_dropout", False)),  # both defaults are transformers' EsmConfig's
            "layer_norm_eps": float(1e-12 if eps is None else eps)}


def set_layer_norm_eps(model: torch.nn.Module, eps: float) -> None:
    """Every LayerNorm of `model` (torch's or apex's, as fair-esm picks) with epsilon `eps`."""
    for module in model.modules():
        if "LayerNorm" in type(module).__name__ and hasattr(module, "eps"):
            module.eps = eps


def _hf_folder(path: Path) -> Tuple[Path, dict]:
    """(weights file, config.json as a dict or {}) of a Hugging Face ESM directory or weights file."""
    if path.is_dir():
        try:
            weights = hf_weights_file(path)
        except LanguageModelError:
            raise LanguageModelError(f"{path} has neither model.safetensors nor pytorch_model.bin") from None
        config_file = path / "config.json"
    else:
        weights, config_file = path, path.parent / "config.json"
    config = read_json(config_file, dict, "model config") if config_file.is_file() else {}
    if config and config.get("model_type") not in (None, "esm"):
        raise LanguageModelError(f"{path}: config model_type is {config.get('model_type')!r}, not 'esm'")
    return weights, config


def load_hf_esm(path: Path, heads: Optional[int] = None):
    """A fair-esm ESM2 from a Hugging Face ESM checkpoint (directory or weights file): an `EsmModel`/`EsmFor*`,
    or the ESM-2 inside an `EsmForProteinFolding` folder (its `esm.*` tensors; the folding part is not read here).
    config.json's fields that change the forward are honoured or refused (`hf_esm_settings`)."""
    path = Path(path)
    weights, config = _hf_folder(path)
    folding = bool(config.get("is_folding_model"))  # ESMFold: its ESM-2 (esm.*) only
    raw = read_hf_weights(weights, keep=(lambda k: k.startswith("esm.")) if folding else None)
    settings = hf_esm_settings(config, raw, path)
    check_tensors({k: v for k, v in raw.items() if v.is_floating_point()}, weights)
    try:
        sd, ignored = convert_hf_esm_state_dict(raw)
    except LanguageModelError as exc:
        raise LanguageModelError(f"{weights}: {exc}") from None
    heads = heads or config.get("num_attention_heads")
    n_layers, dim, heads = _infer_shape(sd, heads)
    ffn = sd["layers.0.fc1.weight"].shape[0]
    if ffn != 4 * dim:  # fair-esm's ESM2 fixes the feed-forward width at 4·d
        raise LanguageModelError(f"{path}: feed-forward width {ffn} is not 4 x {dim}; not an ESM-2 architecture")
    if sd["embed_tokens.weight"].shape[0] != 33:
        raise LanguageModelError(f"{path}: {sd['embed_tokens.weight'].shape[0]} token embeddings; ESM-2 has 33")
    model = _build_esm2(n_layers, dim, heads, token_dropout=settings["token_dropout"])
    set_layer_norm_eps(model, settings["layer_norm_eps"])
    sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])  # tied in fair-esm
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise LanguageModelError(f"{path}: unexpected parameters after conversion: {', '.join(unexpected[:6])}")
    missing = [k for k in missing if not k.endswith("rot_emb.inv_freq")]  # recomputed by fair-esm
    if any(not k.startswith(("lm_head.", "contact_head.")) for k in missing):
        raise LanguageModelError(f"{path}: missing parameters after conversion: {', '.join(missing[:6])}")
    if missing:
        log.info("%s has no %s; they keep their random initialisation (the folding model does not use them)",
                 path, ", ".join(sorted({k.split('.')[0] for k in missing})))
    return model


def load_fair_esm_checkpoint(path: Path):
    """A local fair-esm `.pt` (ESM-2 `cfg` format or ESM-1 `args` format); the contact-regression
    file beside it (`<stem>-contact-regression.pt`) is optional, unlike in fair-esm's own loader.

    Read through the project's weights-only loader (`runtime.artifacts.torch_load`, with fair-esm's
    `argparse.Namespace` allow-listed in `compat`), whatever torch's default; weights must be finite.
    """
    import esm

    data = torch_load(path)
    if not isinstance(data, dict) or "model" not in data or not ({"cfg", "args"} & set(data)):
        raise LanguageModelError(f"{path}: not a fair-esm checkpoint (expected keys 'model' and 'cfg' or 'args')")
    if not isinstance(data["model"], dict):
        raise LanguageModelError(f"{path}: not a fair-esm checkpoint ('model' is not a state dict)")
    check_tensors({k: v for k, v in data["model"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()},
                  path)
    regression_path = path.with_name(f"{path.stem}-contact-regression.pt")
    regression = torch_load(regression_path) if regression_path.is_file() else None
    # fair-esm picks the ESM-2 code path by name; a renamed ESM-2 file is recognised by its `cfg`
    name = path.stem if path.stem.startswith("esm") else ("esm2_local" if "cfg" in data else "esm1_local")
    try:
        return esm.pretrained.load_model_and_alphabet_core(name, data, regression)
    except (KeyError, RuntimeError, AttributeError, TypeError) as exc:
        raise LanguageModelError(f"{path}: fair-esm cannot build a model from it ({type(exc).__name__}: {exc})") \
            from exc


def looks_like_path(name: str) -> bool:
    """A model.lm.name that names a file (fair-esm would torch.load it itself): route it to our loader."""
    return name.endswith((".pt", ".pth")) or "/" in name or name.startswith("~")


# --- SDPA attention switch (esm_attention.py): model.lm.sdpa, on unless set to False ---
def load_language_model(lm_cfg):
    """(ESM2 model, alphabet, description) from a config with keys name, path, random_init, heads, sdpa."""
    model, alphabet, description = _load_language_model(lm_cfg)
    if lm_cfg.get("sdpa", True):
        enable_sdpa(model)  # attention without the L×L probability tensor, same outputs
    set_storage_dtype(model, lm_cfg.get("storage_dtype", "float32"))  # frozen-LM storage (block below)
    return model, alphabet, description
# --- end of the SDPA attention switch ---


# --- frozen-LM storage dtype: model.lm.storage_dtype, "float32" (default) or "bfloat16" ---
# The LM's base parameters are stored in bf16 (half the bytes); adapter factors (`peft.*`) and
# buffers (the rotary inv_freq: bf16 cannot hold positions above 256 exactly) keep their dtype.
# `lm_autocast` runs the LM's forward under autocast in that dtype (model.py), so every matmul and
# the adapters' deltas run in bf16 while the float32 factors receive float32 gradients; the
# folding model casts the representations to float32 before the trunk. Only for a frozen LM
# (adapter.method lorta, lora or none): a trainable bf16 LM parameter is refused at its forward.
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _base_parameters(lm):
    return [p for n, p in lm.named_parameters() if not is_adapter_param(n)]


def set_storage_dtype(lm, dtype) -> int:
    """Store the LM's base parameters in `dtype` ("float32" or "bfloat16"); returns their bytes after.

    Tied parameters stay tied (each Parameter object is cast once, in place of its `.data`)."""
    if dtype not in STORAGE_DTYPES:
        raise LanguageModelError(f"model.lm.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    target = STORAGE_DTYPES[dtype]
    params = _base_parameters(lm)
    for p in params:
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
    return sum(p.numel() * p.element_size() for p in params)


def lm_autocast(lm, device_type: str):
    """The context for the LM's forward: autocast in its storage dtype when that is not float32."""
    import contextlib

    weight = getattr(getattr(lm, "embed_tokens", None), "weight", None)
    dtype = weight.dtype if weight is not None else torch.float32
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    if torch.is_grad_enabled() and any(p.requires_grad for p in _base_parameters(lm)):
        raise LanguageModelError(f"the language model is stored in {dtype} (model.lm.storage_dtype) but some of its "
                                 "base parameters are trainable: bf16 storage is for a frozen LM (adapter.method "
                                 "lorta, lora or none), not for full fine-tuning")
    return torch.autocast(device_type, dtype=dtype)
# --- end of the frozen-LM storage dtype ---


def _load_language_model(lm_cfg):
    import esm

    path = lm_cfg.get("path")
    name = lm_cfg.get("name")
    if not path and name and looks_like_path(name):
        path = name
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise LanguageModelError(f"language model path {p} does not exist")
        if p.is_file() and p.suffix == ".pt":
            model, alphabet = load_fair_esm_checkpoint(p)
            return model, alphabet, f"fair-esm checkpoint {p}"
        model = load_hf_esm(p, heads=lm_cfg.get("heads"))
        return model, model.alphabet, f"Hugging Face ESM checkpoint {p} (converted)"
    if not name:
        raise LanguageModelError("no language model given: set model.lm.name or model.lm.path")
    if lm_cfg.get("random_init"):
        layout = architecture(name)
        warnings.warn(f"language model {name} is RANDOMLY INITIALISED (model.lm.random_init=True): "
                      "results say nothing about a pretrained ESM-2", stacklevel=3)
        model = _build_esm2(layout.n_layers, layout.d_model, layout.n_heads)
        return model, model.alphabet, f"random {name}"
    try:
        model, alphabet = esm.pretrained.load_model_and_alphabet(name)
    except Exception as exc:  # offline machines end here
        raise LanguageModelError(
            f"could not load {name!r} with fair-esm ({type(exc).__name__}: {exc}). Without network, give a local "
            "checkpoint with model.lm.path=FILE_OR_DIR (fair-esm .pt or Hugging Face ESM), or set "
            "model.lm.random_init=True for random weights") from exc
    return model, alphabet, f"fair-esm {name}"
