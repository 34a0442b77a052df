"""From a config to a model: language model, adapter (or none / full), trunk and heads."""

from __future__ import annotations

import functools
import logging
import sys

import ml_collections as mlc
import torch

from ...adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set, is_adapter_param
from ...adapters.config import parse_modes
from ...runtime.errors import ConfigError
from ..run.config import ADAPTERS, COMPILE_MODES, adapter_alpha, trained_parts
from .lm import load_language_model
from .esmfold import AdaptedESMFold

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
    if name.startswith(("ptm_head.", "lddt_head.")):
        return "confidence"
    if name.startswith(("distogram_head.", "lm_head.")):
        return "heads"
    return "embeddings"  # esm_s_combine, esm_s_mlp, embedding


def build_model(cfg: mlc.ConfigDict) -> AdaptedESMFold:
    """The folding model with the language model and trunk set up for `cfg.adapter` and `cfg.model.trainable`.

    adapter.method lorta/lora: an adapter on the LM's attention (adapter.scope lm), on the trunk's
    sequence and triangle attention (trunk, one CP tensor per family), or both; base weights under
    an adapter are frozen. none: LM frozen; full: LM trainable. Outside the LM, the parts named in
    `model.trainable` train (embeddings, trunk, structure_module, heads: all of them when the trunk is
    retrained from scratch; none, or only the confidence heads, when a pretrained ESMFold is fine-tuned
    through adapters).
    Heads that no configured loss trains (the LM head always, pTM when its weight is 0, pLDDT when
    its weight is 0) are frozen, so every trainable parameter gets a gradient (DDP needs that).
    """
    lm, alphabet, description = load_language_model(cfg.model.lm)
    log.info("language model: %s", description)
    model = AdaptedESMFold(lm, alphabet, cfg.model.trunk, lddt_head_hid_dim=cfg.model.lddt_head_hid_dim,
                           checkpoint_blocks=cfg.model.checkpoint_blocks)
    model.lm_description = description
    method, scope = cfg.adapter.method, cfg.adapter.get("scope", "lm")
    trainable = trained_parts(cfg.model.trainable)
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
    set_compile(model, cfg.model.get("compile", "none"))
    return model


# --- torch.compile of the trunk blocks and the LM layers: model.compile ---------------------------------
# Each block (layer) is compiled on its own, not the whole model: recycling, the structure module and
# the loss stay eager Python, chunk sizes pass through, a checkpointed block is compiled with its
# checkpoint inside, and the blocks share one compiled code (their parameters are inputs, not
# constants). The compiled call is an instance attribute `forward`, a `functools.partial` like the
# SDPA switch: parameter names and state-dict keys do not change (no `_orig_mod.`), and
# `copy.deepcopy` binds the copy's forward to the copy. LoRTA's eager path computes x·A once for q, k
# and v by remembering it between the hook calls; traced code recomputes it per matrix and
# AOTAutograd's common-subexpression elimination merges the three products back into one.
COMPILE_BACKEND = "inductor"  # tests and smoke runs swap in backends that generate no code
# Adapters add and remove forward hooks on Linears inside the compiled blocks (add_adapter, merge,
# unmerge) and switch them by Python state (active adapter, disabled()). Dynamo guards on that state
# but by default not on the hooks themselves, so after a merge and an unmerge it would keep running a
# graph without the adapter's hook: hook guards on. Blocks without adapters share one graph; an
# adapter's hook picks its layer's factors by a Python index, so each adapted block compiles its own
# (48 in ESMFold's trunk), times grad mode (recycles run without gradients), adapter state and
# lengths: far more cache entries per code object than dynamo's default limit of 8.
DYNAMO_SETTINGS = dict(skip_nnmodule_hook_guards=False, recompile_limit=1024, accumulated_recompile_limit=4096)


def _trunk_block_forward(block, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)  # _CheckpointedBlock too: checkpoint inside the graph


def _lm_layer_forward(layer, *args, **kwargs):  # a code object of its own: LM and trunk keep separate caches
    return type(layer).forward(layer, *args, **kwargs)


_FORWARDS = {"trunk": _trunk_block_forward, "lm": _lm_layer_forward}


@functools.lru_cache(maxsize=None)
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend)


def _run_compiled(fn, module, *args, **kwargs):
    with torch._dynamo.config.patch(**DYNAMO_SETTINGS):
        return _compiled(fn, COMPILE_BACKEND)(module, *args, **kwargs)


def is_compiled(module: torch.nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func is _run_compiled


def compile_blocks(modules, part: str, on: bool = True) -> None:
    """Compile (`on`) or un-compile each module of `modules`: trunk blocks (`part` "trunk") or LM layers ("lm")."""
    for m in modules:
        if on:
            m.forward = functools.partial(_run_compiled, _FORWARDS[part], m)
        elif is_compiled(m):
            del m.__dict__["forward"]


def _compile_targets(model: AdaptedESMFold) -> dict:
    """The trunk's blocks and the LM's layers (fair-esm's ESM-2 and ESM-1 keep them in `layers`)."""
    layers = getattr(model.esm, "layers", None)
    return {"trunk": model.trunk.blocks, "lm": layers if isinstance(layers, torch.nn.ModuleList) else None}


def set_compile(model: AdaptedESMFold, mode: str) -> None:
    """Run each trunk block and/or each LM layer through torch.compile (`mode` as model.compile);
    "none" restores the eager forward. Compilation happens at the first call of each kind of input."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode != "none" and not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"model.compile={mode}: torch.compile does not run on this Python "
                          f"({sys.version.split()[0]}) with torch {torch.__version__}; use model.compile=none")
    targets = _compile_targets(model)
    if mode in ("lm", "both") and targets["lm"] is None:
        raise ConfigError(f"model.compile={mode}: the language model ({type(model.esm).__name__}) has no list of "
                          "layers to compile; use model.compile=trunk or none")
    for part, modules in targets.items():
        if modules is not None:
            compile_blocks(modules, part, on=mode in (part, "both"))


def compile_mode(model: AdaptedESMFold) -> str:
    """Which parts of `model` run compiled: none, trunk, lm or both."""
    on = [part for part, modules in _compile_targets(model).items() if modules and all(map(is_compiled, modules))]
    return "both" if len(on) == 2 else on[0] if on else "none"


def parameter_counts(model: AdaptedESMFold) -> dict:
    """Trainable parameters by part: adapter, language model, trunk and heads."""
    counts = {"adapter": 0, "language_model": 0, "trunk_and_heads": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_adapter_param(name):
            counts["adapter"] += p.numel()
        elif name.startswith("esm."):
            counts["language_model"] += p.numel()
        else:
            counts["trunk_and_heads"] += p.numel()
    counts["total"] = sum(counts.values())
    counts["language_model_total"] = sum(p.numel() for n, p in model.esm.named_parameters()
                                         if not is_adapter_param(n))
    return counts
