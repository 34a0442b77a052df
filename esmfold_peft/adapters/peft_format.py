"""Hugging Face PEFT's LoRA folder format, written and read by our own code (PEFT is not imported).

A LoRA adapter on a model whose projections are Linears of their own (every family but ESMFold's
fused `esmfold-seq`) is written as PEFT writes one, so `PeftModel.from_pretrained(base, DIR)`
loads it with the same outputs:

* `adapter_config.json`: `peft_type: LORA`, `r`, `lora_alpha`, `target_modules`, `task_type`,
  `base_model_name_or_path`, `fan_in_fan_out: false`, `bias: none`, `use_rslora: false`, … Our
  scale α/r is PEFT's `lora_alpha / r` (rsLoRA off), so `lora_alpha` = α.
* `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` (r × in, our A) and
  `….lora_B.weight` (out × r, our B) for each adapted Linear; a classification head trained beside
  it as PEFT's `modules_to_save` (`base_model.model.classifier.weight`, …).

Our base record (see `provenance`) goes into the weights file's header (`esmfold_peft.base`): PEFT
warns about config keys it does not know. Reading takes PEFT LoRA folders from anywhere: rsLoRA's
scale is folded into α; DoRA, biases, per-layer ranks and other options we cannot represent are
refused in one line. LoRTA has no PEFT type and stays in our format.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import DTYPES, LoRAConfig
from .files import BASE_METADATA, AdapterLoadError
from .layouts import FAMILIES, MATRICES, AttentionLayout, unfused

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))
_HEAD_MODULES = ("classifier", "score", "pooler")
# options whose non-default value we cannot represent (name -> the values that are fine)
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None, []),
                "layer_replication": (None,), "lora_bias": (False, None), "target_parameters": (None, []),
                "trainable_token_indices": (None,), "use_qalora": (False, None), "exclude_modules": (None, [])}


def task_type(model: Optional[nn.Module]) -> Optional[str]:
    name = type(model).__name__ if model is not None else ""
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _target_modules(model: Optional[nn.Module], layout: AttentionLayout, targets: Sequence[str]):
    """PEFT's `target_modules`: the projections' relative names when PEFT's suffix rule finds exactly ours
    in the model, else a regular expression of their full paths."""
    names = [FAMILIES[layout.family].proj[m] for m in targets]
    paths = {layout.projection_path(l, m) for l in range(layout.n_layers) for m in targets}
    if model is not None:
        found = {k for k, _ in model.named_modules() if any(k == t or k.endswith("." + t) for t in names)}
        if found == paths:
            return names
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def head_modules(head_names: Sequence[str]) -> List[str]:
    """PEFT `modules_to_save` covering a head's parameters: the path through its classifier/score/pooler."""
    out = []
    for name in head_names:
        parts = name.split(".")[:-1]
        cut = next((i for i, p in enumerate(parts) if p in _HEAD_MODULES), len(parts) - 1)
        out.append(".".join(parts[:cut + 1]))
    return sorted(dict.fromkeys(out))


def write(adapter, layout: AttentionLayout, model: Optional[nn.Module], base: dict,
          head: Dict[str, torch.Tensor], name_or_path: Optional[str]) -> Tuple[dict, Dict[str, torch.Tensor], dict]:
    """(adapter_config.json contents, tensors, header metadata) of a LoRA adapter in PEFT's format;
    `name_or_path` is PEFT's `base_model_name_or_path` (a folder or hub id; None when unknown)."""
    if adapter.method != "lora":
        raise ValueError(f"a {adapter.method} adapter has no PEFT type (PEFT has LoRA, not LoRTA); it stays in "
                         "esmfold-peft's format: load it with esmfold_peft.adapters.load_adapter(model, DIR)")
    if not unfused(layout.family):
        raise ValueError(f"PEFT cannot hold an adapter on {layout.family}'s fused q/k/v projection")
    c = adapter.config
    tensors = {}
    for key, value in adapter.saved_tensors().items():  # lora.{layer}.{matrix}.{A,B}
        _, layer, m, part = key.split(".")
        tensors[f"{PREFIX}{layout.projection_path(int(layer), m)}.lora_{part}.weight"] = value
    tensors.update({PREFIX + n: v for n, v in head.items()})
    meta = {"peft_type": "LORA", "task_type": task_type(model), "base_model_name_or_path": name_or_path,
            "r": c.rank, "lora_alpha": _number(c.alpha), "lora_dropout": c.dropout,
            "target_modules": _target_modules(model, layout, c.targets), "modules_to_save": head_modules(head) or None,
            "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}
    return meta, tensors, {"format": "pt", BASE_METADATA: json.dumps(base)}


# --- reading -----------------------------------------------------------------------------------------

def check_config(meta: dict, path: Path) -> None:
    """Refuse a PEFT config we cannot represent, in one line naming the folder's file and the fault."""
    kind = meta.get("peft_type")
    if kind != "LORA":
        raise AdapterLoadError(path, f"a PEFT {kind} adapter; esmfold-peft reads PEFT LoRA adapters only")
    bad = [f"{k}={meta[k]!r}" for k, fine in _UNSUPPORTED.items() if k in meta and meta[k] not in fine]
    if bad:
        raise AdapterLoadError(path, "a PEFT LoRA adapter with options esmfold-peft cannot represent: " + ", ".join(bad))
    r, alpha = meta.get("r"), meta.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)):
        raise AdapterLoadError(path, f"PEFT config needs a positive integer 'r' and a number 'lora_alpha', "
                                     f"found r={r!r}, lora_alpha={alpha!r}")


def _place(key: str, by_path: dict, path: Path) -> Tuple[int, str, str]:
    """(layer, matrix, A or B) of a PEFT LoRA tensor name, via the model's module paths."""
    module, part = _LORA_KEY.match(key).groups()
    if module not in by_path:
        raise AdapterLoadError(path, f"{module} is not an attention projection (q/k/v/o) of this model "
                                     f"({key}); esmfold-peft adapts attention projections only")
    return (*by_path[module], part)


def read(meta: dict, tensors: Dict[str, torch.Tensor], layout: AttentionLayout,
         weights_path: Path) -> Tuple[LoRAConfig, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(our LoRA config, our tensors `lora.{layer}.{matrix}.{A,B}`, head tensors by parameter name)."""
    if not unfused(layout.family):
        raise AdapterLoadError(weights_path, f"a PEFT adapter cannot go on {layout.family}'s fused q/k/v projection")
    by_path = {layout.projection_path(l, m): (l, m) for l in range(layout.n_layers) for m in MATRICES}
    ours, head, per_layer = {}, {}, {}
    for key, value in tensors.items():
        if _LORA_KEY.match(key):
            layer, m, part = _place(key, by_path, weights_path)
            ours[f"lora.{layer}.{m}.{part}"] = value
            per_layer.setdefault(layer, set()).add(m)
        elif key.startswith(PREFIX) and "lora_" not in key:
            head[key[len(PREFIX):]] = value
        else:
            raise AdapterLoadError(weights_path, f"tensor {key!r} is not a PEFT LoRA factor or a saved module")
    targets = set().union(*per_layer.values()) if per_layer else set()
    if not targets or len(per_layer) != layout.n_layers or any(s != targets for s in per_layer.values()):
        raise AdapterLoadError(weights_path, f"adapts {len(per_layer)} of {layout.n_layers} layers or not the same "
                                             "projections in each; esmfold-peft adapters cover every layer alike")
    rank, alpha = meta["r"], float(meta["lora_alpha"])
    if meta.get("use_rslora"):  # PEFT's rsLoRA scale lora_alpha/√r is our alpha/r with alpha = lora_alpha·√r
        alpha *= math.sqrt(rank)
    dtype = next((k for k, v in DTYPES.items() if v == next(iter(ours.values())).dtype), "float32")
    config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(m for m in MATRICES if m in targets),
                        dropout=float(meta.get("lora_dropout") or 0.0), dtype=dtype)
    return config, ours, head
