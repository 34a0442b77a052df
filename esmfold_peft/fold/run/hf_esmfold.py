"""Hugging Face's ESMFold: transformers' `EsmForProteinFolding` folders, read for our model and written from it.

A folder (as `facebook/esmfold_v1`) holds `config.json` and the weights (`model.safetensors` or
`pytorch_model.bin`, or shards named by `model.safetensors.index.json` / `pytorch_model.bin.index.json`).
config.json is an `EsmConfig` with `is_folding_model: true`: the ESM-2's fields at its top (read by
`model.lm.load_hf_esm`), ESMFold's in `esmfold_config`, with `trunk` and `trunk.structure_module`.
The weights are one state dict: the ESM-2 as a transformers `EsmModel` under `esm.`, the `af2_to_esm`
buffer, and the trunk and heads under the names fair-esm's ESMFold gives them (transformers' port kept
them: `hf_to_esmfold_key` is the whole mapping, `esmfold_to_hf_key` its inverse).

This module turns a folder into what `esmfold_read` works with: fair-esm's cfg["model"] layout (the
structure module's fields renamed, `HF_STRUCTURE_MODULE`) and the folding state dict in our names
(`read_hf_esmfold`); `esmfold_read` dispatches here for a folder or its weights file, and the LM comes from
the folder through `load_hf_esm` (which keeps its `esm.*` tensors). Fields of `esmfold_config` and its
sections that this project does not know are refused by name, as are the values that select a computation
neither fair-esm's ESMFold nor ours implements (`UNSUPPORTED_FLAGS`); transformers' own generic config
fields (`GENERIC_FIELDS`) are ignored. `fp16_esm` is not followed: the LM runs in float32 (as
`esm-fold --cpu-only`), unless `model.lm.storage_dtype` says otherwise.

The other way, `hf_config` and `hf_state` give what `EsmForProteinFolding.from_pretrained` reads for a
model of ours (`esmfold_write.export_hf_esmfold` writes the folder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ...runtime.artifacts import check_tensors, read_json
from ...runtime.errors import ArtifactError
from .confidence import RECORD_KEY, read_file_record
from ..model.lm import HF_INDEXES, HF_WEIGHTS, LanguageModelError, hf_weights_file, read_hf_weights

CONFIG = "config.json"
# transformers' StructureModuleConfig field -> openfold's StructureModule argument (fair-esm's trunk config)
HF_STRUCTURE_MODULE = {"sequence_dim": "c_s", "pairwise_dim": "c_z", "ipa_dim": "c_ipa", "resnet_dim": "c_resnet",
                       "num_heads_ipa": "no_heads_ipa", "num_qk_points": "no_qk_points",
                       "num_v_points": "no_v_points", "dropout_rate": "dropout_rate", "num_blocks": "no_blocks",
                       "num_transition_layers": "no_transition_layers", "num_resnet_blocks": "no_resnet_blocks",
                       "num_angles": "no_angles", "trans_scale_factor": "trans_scale_factor", "epsilon": "epsilon",
                       "inf": "inf"}
TRUNK_FIELDS = ("num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width", "pairwise_head_width",
                "position_bins", "dropout", "layer_drop", "cpu_grad_checkpoint", "max_recycles", "chunk_size",
                "structure_module")
ESMFOLD_FIELDS = ("esm_type", "fp16_esm", "use_esm_attn_map", "esm_ablate_pairwise", "esm_ablate_sequence",
                  "esm_input_dropout", "embed_aa", "bypass_lm", "lddt_head_hid_dim", "trunk")
# esmfold_config flags whose other values select a computation the public ESMFold does not run
UNSUPPORTED_FLAGS = {"use_esm_attn_map": False, "bypass_lm": False, "embed_aa": True, "esm_ablate_sequence": False}
# what any transformers config (4.x and 5.x) may carry besides its own fields: naming, generation, output
# switches; none changes ESMFold's forward
GENERIC_FIELDS = frozenset((
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "auto_map", "dtype",
    "torch_dtype", "transformers_version", "model_type", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
    "chunk_size_feed_forward", "output_attentions", "output_hidden_states", "output_scores", "return_dict",
    "return_dict_in_generate", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing"))
# tensors of the folding part that are not parameters of ours: the vocabulary map (checked, not loaded) and
# openfold's residue constants (rebuilt)
AF2_TO_ESM = "af2_to_esm"
_CONSTANTS = re.compile(r"^trunk\.structure_module\.(default_frames|group_idx|atom_mask|lit_positions)$")
_LEGACY_NORM = re.compile(r"^(.*(?:norm|Norm)[^.]*)\.(gamma|beta)$")  # LayerNorms under their legacy names


def is_hf_esmfold(path) -> bool:
    """Whether `path` is to be read as a Hugging Face folder: a directory, its config.json, any *.safetensors
    file, or `pytorch_model.bin` or a shard index (*.index.json) with config.json beside it."""
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".safetensors" or (path.name == CONFIG and path.is_file()):
        return True
    return (path.name in HF_WEIGHTS or path.name.endswith(".index.json")) and (path.parent / CONFIG).is_file()


def hf_folder(path) -> tuple[Path, Path]:
    """(folder, its weights file) for a folder (or its config.json) or a weights file in one; faults name what was
    given."""
    path = Path(path).expanduser()
    path = path.parent if path.name == CONFIG and path.is_file() else path
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ArtifactError(path, "no such file or folder")
    if not (folder / CONFIG).is_file():
        where = "in it" if path.is_dir() else "beside it"
        raise ArtifactError(path, f"no {CONFIG} {where}: not a Hugging Face ESMFold folder (EsmForProteinFolding "
                                  "writes config.json beside its weights) nor a fair-esm ESMFold .pt file")
    if path.is_dir():
        try:
            return folder, hf_weights_file(folder)
        except LanguageModelError:
            raise ArtifactError(folder, f"no weights file ({', '.join(HF_WEIGHTS + HF_INDEXES[:1])})") from None
    return folder, path


def read_hf_config(folder: Path, given: Optional[Path] = None) -> dict:
    """config.json of an EsmForProteinFolding folder, with its `esmfold_config` checked (`check_esmfold_config`);
    `given`: the path the user named (a file in the folder), which the fault of a wrong folder names."""
    path = folder / CONFIG
    config = read_json(path, dict, "model config")
    if "model_type" not in config and {"model", "train"} <= set(config):
        where = "is in" if given is not None and given != folder else "is"
        raise ArtifactError(given or folder, f"{where} a training run of this project, not an ESMFold folder "
                                             "(predict from the run with --run)")
    if config.get("model_type") != "esm":
        raise ArtifactError(path, f"model_type is {config.get('model_type')!r}: not a transformers ESM model")
    if not config.get("is_folding_model"):
        raise ArtifactError(path, "is_folding_model is not true: a Hugging Face ESM language model, not an ESMFold "
                                  "(give it as the language model, --lm / model.lm.path)")
    if not isinstance(config.get("esmfold_config"), Mapping):
        raise ArtifactError(path, "has no esmfold_config section (transformers' ESMFold writes one)")
    check_esmfold_config(config, path)
    return config


def _section(values, where: str, known, path: Path) -> dict:
    if not isinstance(values, Mapping):
        raise ArtifactError(path, f"{where} is not a mapping")
    unknown = sorted(k for k in values if k not in known and k not in GENERIC_FIELDS)
    if unknown:
        raise ArtifactError(path, f"{where}.{unknown[0]} is not a field of transformers' ESMFold config"
                                  f"{' (nor ' + ', '.join(unknown[1:]) + ')' if unknown[1:] else ''}; refused, as it "
                                  "may change the computation")
    return {k: v for k, v in values.items() if k in known}


def check_esmfold_config(config: Mapping, path: Path) -> None:
    """Unknown fields of esmfold_config, its trunk and structure module, and unsupported flags, refused by name;
    a vocabulary other than ESM-2's too (the trunk's input order depends on it)."""
    esmfold = _section(config["esmfold_config"], "esmfold_config", ESMFOLD_FIELDS, path)
    trunk = _section(esmfold.get("trunk") or {}, "esmfold_config.trunk", TRUNK_FIELDS, path)
    _section(trunk.get("structure_module") or {}, "esmfold_config.trunk.structure_module", HF_STRUCTURE_MODULE,
             path)
    for name, ok in UNSUPPORTED_FLAGS.items():
        if name in esmfold and esmfold[name] is not None and bool(esmfold[name]) != ok:
            raise ArtifactError(path, f"esmfold_config.{name}={esmfold[name]!r} is not supported (the public "
                                      "ESMFold's computation, which this project runs, needs "
                                      f"{name}={str(ok).lower()})")
    import esm

    tokens = list(esm.data.Alphabet.from_architecture("ESM-1b").all_toks)
    if config.get("vocab_list") is not None and list(config["vocab_list"]) != tokens:
        raise ArtifactError(path, "vocab_list is not the ESM-2 vocabulary (fair-esm's ESM-1b alphabet, in its "
                                  "order); another vocabulary is not supported")


def esmfold_model_config(config: Mapping) -> dict:
    """fair-esm's cfg["model"] for a checked config.json: its trunk with openfold's structure-module names."""
    esmfold = {k: v for k, v in config["esmfold_config"].items() if k in ESMFOLD_FIELDS}
    trunk = {k: v for k, v in (esmfold.pop("trunk", None) or {}).items() if k in TRUNK_FIELDS}
    sm = trunk.pop("structure_module", None) or {}
    trunk["structure_module"] = {HF_STRUCTURE_MODULE[k]: v for k, v in sm.items() if k in HF_STRUCTURE_MODULE}
    # transformers' defaults for what its config.json may leave out (EsmFoldConfig, TrunkConfig)
    esmfold.setdefault("lddt_head_hid_dim", 128)
    trunk = {k: v for k, v in trunk.items() if v is not None or k == "chunk_size"}
    return {**esmfold, "trunk": trunk}


def hf_to_esmfold_key(key: str) -> Optional[str]:
    """Our (fair-esm's) name for a tensor of an `EsmForProteinFolding` state dict; None where it is not ours to load.

        esm.*                                  -> None: the ESM-2, read by `load_hf_esm` (fair-esm ESM2 names)
        af2_to_esm                             -> None: rebuilt from the vocabulary (checked by `hf_fold_state`'s
                                                  caller, `esmfold_read.load_esmfold_state`)
        trunk.structure_module.{default_frames, group_idx, atom_mask, lit_positions} -> None: openfold's constants
        <…norm…>.gamma / .beta                 -> .weight / .bias (legacy names some transformers versions write)
        everything else: esm_s_combine, esm_s_mlp.*, embedding.*, trunk.* (blocks, recycling, structure module),
        distogram_head.*, ptm_head.*, lm_head.*, lddt_head.* -> unchanged

    The IPA point projections keep openfold 0.0.1's names here (`…ipa.linear_q_points.weight`), as fair-esm's
    files; `compat.match_ipa_point_names` renames them for the installed openfold when they are loaded.
    """
    if key.startswith("esm.") or key == AF2_TO_ESM or _CONSTANTS.match(key):
        return None
    m = _LEGACY_NORM.match(key)
    return f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}" if m else key


def esmfold_to_hf_key(key: str) -> str:
    """transformers' name for a tensor of our folding part (the inverse of `hf_to_esmfold_key`): unchanged but for
    the IPA point projections of openfold >= 2.0 (`…_points.linear.*`), which transformers names `…_points.*`."""
    return re.sub(r"(ipa\.linear_(?:q|kv)_points)\.linear\.", r"\1.", key)


def hf_fold_state(raw: Mapping[str, torch.Tensor]) -> dict:
    """The folding part of an `EsmForProteinFolding` state dict in our names (`hf_to_esmfold_key`), with the file's
    `af2_to_esm` kept for `esmfold_read.load_esmfold_state` to check against ours."""
    state = {AF2_TO_ESM: raw[AF2_TO_ESM]} if AF2_TO_ESM in raw else {}
    for key, value in raw.items():
        ours = hf_to_esmfold_key(key)
        if ours is not None:
            state[ours] = value
    return state


def read_hf_esmfold(path) -> tuple[dict, dict, Optional[dict], Path]:
    """(fair-esm-layout cfg["model"], folding state dict in our names, the record of how its confidence heads were
    trained, the weights file) of an EsmForProteinFolding folder or its weights file. The record is config.json's
    `RECORD_KEY` entry, which this project's exporter writes (transformers keeps it as an attribute); without one
    (Meta's folders) it is None: Meta's heads. Faults are `ArtifactError`s naming the folder or file."""
    path = Path(path).expanduser()
    path = path.parent if path.name == CONFIG and path.is_file() else path
    folder = path if path.is_dir() else path.parent
    config = read_hf_config(folder, path) if (folder / CONFIG).is_file() else None  # what it is, before what it lacks
    folder, weights = hf_folder(path)
    record = read_file_record(config, folder / CONFIG)
    raw = read_hf_weights(weights, keep=lambda k: not k.startswith("esm."))  # the ESM-2 is load_hf_esm's
    if not any(k.startswith("trunk.") for k in raw):
        raise ArtifactError(weights, "holds no ESMFold trunk (no trunk.* tensors)")
    state = hf_fold_state(raw)
    check_tensors(state, weights, allow_integer=(AF2_TO_ESM,))
    return esmfold_model_config(config), state, record, weights


def hf_config(trunk: Mapping, lddt_head_hid_dim: int, esm_type: Optional[str], lm, record: Optional[dict] = None
              ) -> dict:
    """config.json of an `EsmForProteinFolding` for our trunk config and ESM-2 (fair-esm `ESM2` `lm`), with `record`
    (`confidence.file_record`: how the heads were trained) under `RECORD_KEY` when given."""
    trunk = dict(trunk)
    sm = {hf: trunk["structure_module"][ours] for hf, ours in HF_STRUCTURE_MODULE.items()}
    trunk = {k: trunk[k] for k in TRUNK_FIELDS if k != "structure_module"} | {"structure_module": sm}
    eps = [m.eps for m in lm.modules() if "LayerNorm" in type(m).__name__ and hasattr(m, "eps")]
    alphabet = lm.alphabet
    return {
        "architectures": ["EsmForProteinFolding"], "model_type": "esm", "is_folding_model": True,
        "vocab_size": len(alphabet.all_toks), "vocab_list": list(alphabet.all_toks),
        "pad_token_id": alphabet.padding_idx, "mask_token_id": alphabet.mask_idx, "eos_token_id": alphabet.eos_idx,
        "hidden_size": lm.embed_dim, "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.attention_heads,
        "intermediate_size": 4 * lm.embed_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 1026, "initializer_range": 0.02,
        "layer_norm_eps": float(eps[0]) if eps else 1e-5, "position_embedding_type": "rotary", "rope_theta": 10000.0,
        "emb_layer_norm_before": False, "token_dropout": bool(lm.token_dropout), "use_cache": True,
        "tie_word_embeddings": True, "dtype": "float32",
        "esmfold_config": {"esm_type": esm_type, "fp16_esm": False, "use_esm_attn_map": False,
                           "esm_ablate_pairwise": False, "esm_ablate_sequence": False, "esm_input_dropout": 0.0,
                           "embed_aa": True, "bypass_lm": False, "lddt_head_hid_dim": int(lddt_head_hid_dim),
                           "trunk": trunk},
    } | ({RECORD_KEY: dict(record)} if record is not None else {})


def hf_state(fold_state: Mapping[str, torch.Tensor], lm_state: Mapping[str, torch.Tensor],
             af2_to_esm: torch.Tensor) -> dict:
    """An `EsmForProteinFolding` state dict: our folding part (`esmfold_to_hf_key`), `af2_to_esm`, and the ESM-2 in
    transformers' names under `esm.` (`lm_state`, already converted by `model.lm.fair_esm_to_hf_state_dict`)."""
    state = {esmfold_to_hf_key(k): v for k, v in fold_state.items() if not k.startswith("esm.")}
    state[AF2_TO_ESM] = af2_to_esm
    state.update({f"esm.{k}": v for k, v in lm_state.items()})
    return state
