"""The networks of the NLP harness: Hugging Face encoders with a classification head, causal LMs, and
how the adapter core goes on them.

`model.name` picks the network:

* a registry default: `minilm` (BERT encoder) or `smollm2` (SmolLM2-135M-Instruct, Llama with GQA),
  fetched and cached on first use (see `sources`);
* a folder holding a Hugging Face checkpoint (config.json, weights, tokenizer files): RoBERTa-base,
  BERT, Llama-2, … whatever the folder holds;
* `random`: a small network built from `model.random` with random weights and a byte-level
  tokenizer made here (tests, and smoke runs without any download).

`adapter.method` is lorta or lora (the core, on attention q/k/v/o, base frozen), none (only the
head trains) or full (everything trains). A classification head always trains fully.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ml_collections as mlc
import torch
from torch import nn

from ..adapters import (AdapterError, LayoutError, LoRAConfig, LoRTAConfig, add_adapter, detect_layout, is_adapted,
                        get_adapter_set)
from ..adapters.config import AdapterConfigError
from ..runtime.artifacts import verify_checksum
from ..runtime.errors import ConfigError, UserError
from . import sources

log = logging.getLogger("esmfold_peft.nlp")

METHODS = ("lorta", "lora", "none", "full")
ENCODER_DEFAULTS = {"minilm": sources.ensure_minilm}
DECODER_DEFAULTS = {"smollm2": sources.ensure_smollm2}
RANDOM_FAMILIES = {"bert", "roberta", "llama", "mpnet"}
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")


@dataclass
class Network:
    """A model, its tokenizer, and what trains in it."""

    model: nn.Module
    tokenizer: object
    description: str
    head_names: list = field(default_factory=list)  # parameter names of the classification head
    counts: dict = field(default_factory=dict)

    @property
    def adapter_set(self):
        return getattr(self.model, "peft", None)


# --- tokenizers ---------------------------------------------------------------------------------

def byte_tokenizer(kind: str):
    """A byte-level tokenizer (256 byte tokens + specials, no merges): needs no download, covers any text.

    `kind` "encoder" wraps texts as `<s> A </s>` / `<s> A </s> B </s>`; "decoder" prefixes `<s>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() comes in a random order
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = {t: vocab[t] for t in ("<s>", "</s>")}
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=list(ids.items()))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", ids["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


# --- building ----------------------------------------------------------------------------------

def resolve_model_dir(cfg: mlc.ConfigDict, defaults: dict) -> Optional[Path]:
    """The checkpoint folder for model.name (fetched for a registry default); None for `random`."""
    name = cfg.model.name
    if name == "random":
        return None
    if name in defaults:
        return defaults[name](cfg.data.root or None)
    folder = Path(name).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        known = ", ".join(sorted(defaults) + ["random"])
        raise UserError(f"model.name {name!r} is neither a known model ({known}) nor a folder holding a "
                        "Hugging Face checkpoint (config.json, weights, tokenizer)")
    return folder


def _verify_weights(folder: Path) -> None:
    for weights in folder.glob("*.safetensors"):
        verify_checksum(weights)  # our own caches carry a sidecar; a user's folder may not


def random_config(cfg: mlc.ConfigDict, vocab_size: int, **extra):
    r = cfg.model.random
    family = r.family
    if family not in RANDOM_FAMILIES:
        raise ConfigError(f"model.random.family must be one of {sorted(RANDOM_FAMILIES)}, got {family!r}")
    common = dict(vocab_size=vocab_size, hidden_size=r.hidden_size, num_hidden_layers=r.num_layers,
                  num_attention_heads=r.num_heads, intermediate_size=r.intermediate_size, pad_token_id=0, **extra)
    positions = cfg.model.max_length + 4
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(num_key_value_heads=r.num_kv_heads or r.num_heads, max_position_embeddings=positions,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **common)
    if family == "bert":
        from transformers import BertConfig

        return BertConfig(max_position_embeddings=positions, **common)
    if family == "roberta":
        from transformers import RobertaConfig

        return RobertaConfig(max_position_embeddings=positions, bos_token_id=1, eos_token_id=2, **common)
    from transformers import MPNetConfig

    return MPNetConfig(max_position_embeddings=positions, bos_token_id=1, eos_token_id=2, **common)


def build_classifier(cfg: mlc.ConfigDict, num_labels: int) -> Network:
    """An encoder with a sequence-classification head (num_labels=1: regression, MSE)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    problem = "regression" if num_labels == 1 else "single_label_classification"
    folder = resolve_model_dir(cfg, ENCODER_DEFAULTS)
    if folder is None:
        from transformers import AutoModelForSequenceClassification as Auto

        tokenizer = byte_tokenizer("encoder")
        config = random_config(cfg, len(tokenizer), num_labels=num_labels, problem_type=problem)
        model = Auto.from_config(config)
        description = f"random {cfg.model.random.family} ({_shape(config)})"
    else:
        _verify_weights(folder)
        with sources.quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels,
                                                                       problem_type=problem, dtype=torch.float32)
        description = f"{cfg.model.name} ({_shape(model.config)})"
    heads = head_parameter_names(model)
    return Network(model, tokenizer, description, heads)


def build_causal_lm(cfg: mlc.ConfigDict) -> Network:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(cfg, DECODER_DEFAULTS)
    if folder is None:
        tokenizer = byte_tokenizer("decoder")
        config = random_config(cfg, len(tokenizer))
        model = AutoModelForCausalLM.from_config(config)
        description = f"random {cfg.model.random.family} ({_shape(config)})"
    else:
        _verify_weights(folder)
        with sources.quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        description = f"{cfg.model.name} ({_shape(model.config)})"
    if tokenizer.pad_token_id is None:  # Llama tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return Network(model, tokenizer, description)


def _shape(config) -> str:
    kv = getattr(config, "num_key_value_heads", None)
    heads = f"{config.num_attention_heads}" + (f"/{kv} kv" if kv and kv != config.num_attention_heads else "")
    return f"{config.model_type}, L={config.num_hidden_layers}, d={config.hidden_size}, heads={heads}"


def head_parameter_names(model: nn.Module) -> list[str]:
    """The classification head: the task-specific layers (and BERT's pooler, which feeds them)."""
    return [n for n, _ in model.named_parameters()
            if n.startswith(("classifier.", "score.")) or ".pooler." in n or n.startswith("pooler.")]


# --- adapters ------------------------------------------------------------------------------------

def adapter_config(cfg: mlc.ConfigDict):
    a = cfg.adapter
    try:
        if a.method == "lorta":
            return LoRTAConfig(rank=a.rank, alpha=a.alpha, targets=tuple(a.targets), dropout=a.dropout,
                               modes=tuple(a.modes))
        return LoRAConfig(rank=a.rank, alpha=a.alpha, targets=tuple(a.targets), dropout=a.dropout)
    except AdapterConfigError as exc:
        raise ConfigError(f"adapter: {exc}") from exc


def prepare_training(net: Network, cfg: mlc.ConfigDict) -> dict:
    """Put the adapter on (or not) and set what trains; return the parameter counts."""
    method = cfg.adapter.method
    if method not in METHODS:
        raise ConfigError(f"adapter.method must be one of {', '.join(METHODS)}, got {method!r}")
    model = net.model
    total = sum(p.numel() for p in model.parameters())
    adapter_params = 0
    if is_adapted(method):
        try:
            adapter = add_adapter(model, adapter_config(cfg), freeze=True)
        except (LayoutError, AdapterError) as exc:
            raise UserError(f"cannot put a {method} adapter on {net.description}: {exc}") from exc
        adapter_params = sum(p.numel() for p in adapter.parameters())
    elif method == "none":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = dict(model.named_parameters())
    for name in net.head_names:
        params[name].requires_grad_(True)
    head = sum(params[n].numel() for n in net.head_names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    net.counts = {"adapter": adapter_params, "head": head, "trainable": trainable, "total": total,
                  "base": total - adapter_params}
    if trainable == 0:
        raise ConfigError(f"adapter.method={method} leaves nothing to train on this task "
                          "(use lorta, lora or full)")
    return net.counts


def describe_layout(net: Network) -> Optional[dict]:
    aset = net.adapter_set
    if aset is not None:
        return aset.layout.describe()
    try:
        return detect_layout(net.model).describe()
    except LayoutError:
        return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(state) != want:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise UserError(f"{source}: the checkpoint's trained parameters do not match this model "
                        f"(missing {missing[:4]}, unexpected {extra[:4]})")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise UserError(f"{source}: {n} has shape {tuple(v.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(v)


def reference_disabled(net: Network):
    """A context in which the network runs without its adapter (the DPO reference policy)."""
    return get_adapter_set(net.model).disabled()
