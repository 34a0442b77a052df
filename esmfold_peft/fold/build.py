"""From a config to a model: language model, adapter (or none / full), trunk and heads."""

from __future__ import annotations

import logging

import ml_collections as mlc

from ..adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set
from ..adapters.config import parse_modes
from ..runtime.errors import ConfigError
from .config import ADAPTERS, adapter_alpha, parse_parts
from .lm import load_language_model
from .model import AdaptedESMFold

log = logging.getLogger(__name__)


def adapter_config(cfg: mlc.ConfigDict):
    """The core's adapter config for `cfg.adapter` (None for `none` and `full`)."""
    a = cfg.adapter
    if a.method not in ADAPTERS:
        raise ConfigError(f"adapter.method must be one of {', '.join(ADAPTERS)}, got {a.method!r}")
    if a.method in ("none", "full"):
        return None
    common = dict(rank=int(a.rank), alpha=adapter_alpha(cfg), dropout=float(a.dropout),
                  targets=tuple(t.strip() for t in str(a.targets).split(",") if t.strip()))
    if a.method == "lora":
        return LoRAConfig(**common)
    return LoRTAConfig(**common, modes=parse_modes(a.modes))


TRUNK_FAMILIES = ("esmfold-seq", "esmfold-tri")  # sequence attention (fused q/k/v) and triangle attention


def part_of(name: str) -> str:
    """Which trainable part a parameter of AdaptedESMFold (outside the LM) belongs to."""
    if name.startswith("trunk.structure_module."):
        return "structure_module"
    if name.startswith("trunk."):
        return "trunk"
    if name.startswith(("distogram_head.", "ptm_head.", "lddt_head.", "lm_head.")):
        return "heads"
    return "embeddings"  # esm_s_combine, esm_s_mlp, embedding


def build_model(cfg: mlc.ConfigDict) -> AdaptedESMFold:
    """The folding model with the language model and trunk set up for `cfg.adapter` and `cfg.model.trainable`.

    adapter.method lorta/lora: an adapter on the LM's attention (adapter.scope lm), on the trunk's
    sequence and triangle attention (trunk, one CP tensor per family), or both; base weights under
    an adapter are frozen. none: LM frozen; full: LM trainable. Outside the LM, the parts named in
    `model.trainable` train (embeddings, trunk, structure_module, heads: all of them when the trunk is
    retrained from scratch, none when a pretrained ESMFold is fine-tuned through adapters).
    Heads that no configured loss trains (the LM head always, pTM when its weight is 0, pLDDT when
    its weight is 0) are frozen, so every trainable parameter gets a gradient (DDP needs that).
    """
    lm, alphabet, description = load_language_model(cfg.model.lm)
    log.info("language model: %s", description)
    model = AdaptedESMFold(lm, alphabet, cfg.model.trunk, lddt_head_hid_dim=cfg.model.lddt_head_hid_dim,
                           checkpoint_blocks=cfg.model.checkpoint_blocks)
    model.lm_description = description
    method, scope = cfg.adapter.method, cfg.adapter.get("scope", "lm")
    trainable = parse_parts(cfg.model.trainable)
    for name, p in model.named_parameters():
        if not name.startswith("esm."):
            p.requires_grad_(part_of(name) in trainable)
    acfg = adapter_config(cfg)
    lm.requires_grad_(method == "full")
    if acfg is not None and scope in ("lm", "both"):
        add_adapter(lm, acfg, name="default", freeze=True)
    if acfg is not None and scope in ("trunk", "both"):
        add_adapter(model.trunk, acfg, name="default", layout=TRUNK_FAMILIES, freeze=False)
        for layout in get_adapter_set(model.trunk).layouts:  # the adapted Linears stay frozen
            for layer in range(layout.n_layers):
                for relative, _ in layout.groups():
                    model.trunk.get_submodule(layout.linear_path(layer, relative)).requires_grad_(False)
    if method == "full":  # parts of ESM-2 that the folding model never reads
        for mod in (lm.lm_head, lm.contact_head):
            mod.requires_grad_(False)
    model.lm_head.requires_grad_(False)  # no masked-LM loss in this training stage
    if not cfg.loss.tm.weight:
        model.ptm_head.requires_grad_(False)
    if not cfg.loss.plddt.weight:
        model.lddt_head.requires_grad_(False)
    return model


def parameter_counts(model: AdaptedESMFold) -> dict:
    """Trainable parameters by part: adapter, language model, trunk and heads."""
    counts = {"adapter": 0, "language_model": 0, "trunk_and_heads": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("esm.peft.", "trunk.peft.")):
            counts["adapter"] += p.numel()
        elif name.startswith("esm."):
            counts["language_model"] += p.numel()
        else:
            counts["trunk_and_heads"] += p.numel()
    counts["total"] = sum(counts.values())
    counts["language_model_total"] = sum(p.numel() for n, p in model.esm.named_parameters()
                                         if not n.startswith("peft."))
    return counts
