"""Training configuration: one ml-collections ConfigDict with every knob, plus overrides.

Named configurations live in the project's `configs/` folder (`demo`, `paper_d4`, …): each is a
Python file with `get_config()` that starts from `base_config()` and changes what it needs.
Command-line flags override keys: `--set train.steps=500 --set model.trunk.num_blocks=4`; unknown
keys get a "did you mean", values of the wrong type a plain message (`esmfold_peft.runtime.config`).
"""

from __future__ import annotations

import math

import ml_collections as mlc

from ...adapters import is_adapted
from ...adapters.config import AdapterConfigError, LoRTAConfig, parse_modes
from ...runtime.config import apply_overrides, load_config_file  # noqa: F401  (scripts import them from here)
from ...runtime.errors import ConfigError
from ...runtime.loop import check_run_keys
from ...runtime.rundir import project_root
from ..model.losses import default_loss_config

ADAPTERS = ("lorta", "lora", "none", "full")
SCOPES = ("lm", "trunk", "both")  # where an adapter goes (adapter.scope)
# what model.trainable may name; "confidence" is the pLDDT and pTM heads alone, "heads" all heads (confidence included)
PARTS = ("embeddings", "trunk", "structure_module", "heads", "confidence")
RETRAIN_PARTS = "embeddings,trunk,structure_module,heads"  # everything: the trunk retrained from scratch
COMPILE_MODES = ("none", "trunk", "lm", "both")  # what model.compile runs through torch.compile


def parse_parts(text: str) -> tuple[str, ...]:
    """`model.trainable` ("embeddings,trunk,…", "" for none) as a tuple, unknown names refused."""
    parts = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"model.trainable: unknown part(s) {', '.join(bad)}; choose among {', '.join(PARTS)}")
    return parts


def trained_parts(trainable: str) -> frozenset[str]:
    """The parts `model.trainable` trains, "heads" standing for the confidence heads as well."""
    parts = set(parse_parts(trainable))
    if "heads" in parts:
        parts.add("confidence")
    return frozenset(parts)


def structure_module_config(c_s=384, c_z=128, no_blocks=8, no_heads_ipa=12, c_ipa=16, c_resnet=128,
                            dropout_rate=0.1) -> dict:
    """All 15 arguments of openfold's StructureModule (fair-esm's trunk passes them through)."""
    return dict(c_s=c_s, c_z=c_z, c_ipa=c_ipa, c_resnet=c_resnet, no_heads_ipa=no_heads_ipa, no_qk_points=4,
                no_v_points=8, dropout_rate=dropout_rate, no_blocks=no_blocks, no_transition_layers=1,
                no_resnet_blocks=2, no_angles=7, trans_scale_factor=10, epsilon=1e-8, inf=1e5)


def trunk_config(num_blocks=48, c_s=1024, c_z=128, seq_head_width=32, pair_head_width=32,
                 structure_module=None) -> dict:
    return dict(num_blocks=num_blocks, sequence_state_dim=c_s, pairwise_state_dim=c_z,
                sequence_head_width=seq_head_width, pairwise_head_width=pair_head_width, position_bins=32,
                dropout=0.0, layer_drop=0.0, cpu_grad_checkpoint=False, max_recycles=4, chunk_size=None,
                structure_module=structure_module or structure_module_config())


def base_config() -> mlc.ConfigDict:
    cfg = mlc.ConfigDict()
    cfg.name = "base"
    cfg.model = mlc.ConfigDict({
        # language model: a fair-esm name, or a local checkpoint path (fair-esm .pt or HF ESM)
        "lm": {"name": "esm2_t12_35M_UR50D", "path": "", "random_init": False, "heads": 0,
               "sdpa": True,  # attention through scaled_dot_product_attention (same outputs, O(L) memory)
               "storage_dtype": "float32"},  # "bfloat16": a frozen LM's weights in bf16, run under bf16 autocast
        "trunk": trunk_config(),
        "lddt_head_hid_dim": 128,
        "checkpoint_blocks": False,  # per-trunk-block activation checkpointing
        # torch.compile of each trunk block and/or each LM layer: none | trunk | lm | both (a speed setting;
        # the same parameters and outputs, compiled on first use: see fold/model/build.py set_compile)
        "compile": "none",
        # what trains outside the LM and the adapters: embeddings, trunk, structure_module, heads (all of
        # them when the trunk is retrained from scratch), confidence (the pLDDT and pTM heads alone: calibrating
        # a pretrained ESMFold's confidence while adapters fine-tune it); "" none
        "trainable": RETRAIN_PARTS,
        # a fair-esm ESMFold checkpoint (e.g. esmfold_3B_v1.pt) whose trunk and heads start a new run; "" = none
        "init_from": "",
    })
    cfg.adapter = mlc.ConfigDict({
        "method": "lorta",  # lorta | lora | none (frozen LM) | full (LM fully trained)
        "rank": 8,
        "alpha": 0.0,  # 0 means alpha = rank (scale 1); a run's config.json stores the resolved value
        "targets": "q,k,v,o",
        "modes": "heads,matrices,layers",
        "scope": "lm",  # where the adapter goes: lm (ESM-2), trunk (folding trunk attention) or both
        "dropout": 0.0,
    })
    cfg.loss = default_loss_config()
    cfg.optim = mlc.ConfigDict({
        "lr": 1e-3, "eps": 1e-6, "betas": (0.9, 0.999),
        "warmup_steps": 1000, "decay_start": 50000, "decay_every": 50000, "decay_factor": 0.95,
        "clip_grad_norm": 0.1,
        "ema_decay": 0.0,  # 0 disables EMA; AF2 uses 0.999 (validation then runs on EMA weights)
        # learning rate of the pLDDT and pTM heads when they train beside adapters (model.trainable=confidence);
        # 0: optim.lr. Adapter factors usually want a far larger rate than a pretrained head's weights.
        "confidence_lr": 0.0,
    })
    cfg.train = mlc.ConfigDict({
        "steps": 1000,
        "batch_size": 1,  # per process and micro-step
        "effective_batch_size": 1,  # reached by gradient accumulation (across processes too)
        "crop_size": 256,
        "max_recycles": 3,  # recycles sampled uniformly in 0..max per step; gradients through the last
        "seed": 0,
        "log_every": 10,
        "val_every": 500,
        "ckpt_every": 500,
        "bf16": True,  # bf16 autocast on GPU (never on CPU)
        "diverge_loss_threshold": 1e4,  # a loss above this (or non-finite) marks the run diverged
        "keep": "best",  # what model/ and adapter/ hold at the end: best (validation LDDT-Ca) or last
        "loggers": "",  # besides metrics.jsonl: tensorboard, wandb, csv (comma-separated; see runtime/loggers.py)
        "num_threads": 0,  # torch CPU threads; 0 leaves torch's default
        "device": "auto",
    })
    cfg.data = mlc.ConfigDict({
        "source": "demo",  # demo | openfold | dir
        "root": "",  # demo: data root (default <project>/data/demo)
        "mmcif_dir": "", "chain_data_cache": "",  # openfold layout
        "train_dir": "", "val_dir": "",  # plain directories of PDB/mmCIF files
        "val_mmcif_dir": "", "val_chain_data_cache": "",  # openfold-layout validation set (optional)
        "cache_dir": "",  # default <project>/data/cache/<source>
        "max_resolution": 9.0, "max_single_residue_fraction": 0.8, "max_length": 0,
        "min_release_date": "", "max_release_date": "",
        "val_max_length": 700, "val_max_chains": 0,
        "unknown_resolution": 0.0,
        "num_workers": 0,
    })
    cfg.val = mlc.ConfigDict({"num_recycles": 3, "crop_size": 0})
    return cfg


# keys that hold file or folder paths: stored portably in a run's config.json, overridable when a run moves
PATH_KEYS = ("model.lm.path", "model.lm.name", "model.init_from", "data.root", "data.cache_dir", "data.mmcif_dir",
             "data.chain_data_cache", "data.train_dir", "data.val_dir", "data.val_mmcif_dir",
             "data.val_chain_data_cache")
# what may change when a run resumes: its length, its cadence, where things are and how it runs
RESUME_FREE = ("train.steps", "train.diverge_loss_threshold", "train.log_every", "train.val_every", "train.ckpt_every",
               "train.keep", "train.loggers", "train.device",
               "train.num_threads", "data.num_workers", "data.val_max_chains", "model.trunk.chunk_size",
               "model.checkpoint_blocks", "model.compile", "name") + PATH_KEYS
# what prediction and evaluation may change in a trained run (--set): where things are and how it runs
USE_FREE = PATH_KEYS + ("train.device", "train.num_threads", "data.num_workers", "data.val_max_chains",
                        "model.checkpoint_blocks", "model.compile", "model.lm.sdpa", "model.lm.storage_dtype",
                        "model.trunk.chunk_size", "val.")


def load_config(name_or_path: str) -> mlc.ConfigDict:
    """A named config from the project's `configs/` (e.g. 'demo') or a path to a config .py file."""
    return load_config_file(name_or_path, project_root() / "configs")


def resolve_alpha(cfg: mlc.ConfigDict) -> None:
    """Store α explicitly: 0 (or unset) means α = r, i.e. scale 1."""
    if is_adapted(cfg) and not cfg.adapter.alpha:
        cfg.adapter.alpha = float(cfg.adapter.rank)


def adapter_alpha(cfg) -> float:
    return float(cfg.adapter.alpha) if cfg.adapter.alpha else float(cfg.adapter.rank)


# (key, test, what the value must be): the ranges no type check catches
_RANGES = (
    ("adapter.rank", lambda v: v >= 1, "at least 1"),
    ("adapter.alpha", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = alpha equals rank)"),
    ("adapter.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.trunk.num_blocks", lambda v: v >= 0, ">= 0 (0: structure module only)"),
    ("model.trunk.chunk_size", lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an integer >= 1"),
    ("model.trunk.max_recycles", lambda v: v >= 0, ">= 0"),
    ("optim.lr", lambda v: math.isfinite(v) and v > 0, "a finite number above 0"),
    ("optim.eps", lambda v: v > 0, "above 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.decay_every", lambda v: v >= 1, "at least 1"),
    ("optim.decay_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.clip_grad_norm", lambda v: v > 0, "above 0"),
    ("optim.ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0 disables EMA)"),
    ("optim.confidence_lr", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: optim.lr)"),
    ("train.steps", lambda v: v >= 1, "at least 1"),
    ("train.batch_size", lambda v: v >= 1, "at least 1"),
    ("train.effective_batch_size", lambda v: v >= 0, ">= 0 (0 = batch_size × processes)"),
    ("train.crop_size", lambda v: v >= 1, "at least 1"),
    ("train.max_recycles", lambda v: v >= 0, ">= 0"),
    ("train.log_every", lambda v: v >= 1, "at least 1"),
    ("train.val_every", lambda v: v >= 0, ">= 0 (0 = only at the start and the end)"),
    ("train.ckpt_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train.diverge_loss_threshold", lambda v: v > 0, "above 0"),
    ("train.num_threads", lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.val_max_chains", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("val.num_recycles", lambda v: v >= 0, ">= 0"),
    ("val.crop_size", lambda v: v >= 0, ">= 0 (0 = whole chains)"),
)


def check_config(cfg: mlc.ConfigDict) -> None:
    """Values that a type check cannot catch, each refused with the key named (ConfigError)."""
    a = cfg.adapter
    if a.method not in ADAPTERS:
        raise ConfigError(f"adapter.method must be one of {', '.join(ADAPTERS)}, got {a.method!r}")
    for key, test, what in _RANGES:
        node = cfg
        for part in key.split("."):
            node = node[part]
        try:
            ok = bool(test(node))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {node!r}")
    storage = cfg.model.lm.storage_dtype
    if storage not in ("float32", "bfloat16"):
        raise ConfigError(f"model.lm.storage_dtype must be float32 or bfloat16, got {storage!r}")
    if storage != "float32" and a.method == "full":
        raise ConfigError("model.lm.storage_dtype=bfloat16 stores a frozen language model; adapter.method=full "
                          "trains it (use float32)")
    if cfg.model.compile not in COMPILE_MODES:
        raise ConfigError(f"model.compile must be one of {', '.join(COMPILE_MODES)}, got {cfg.model.compile!r}")
    if a.scope not in SCOPES:
        raise ConfigError(f"adapter.scope must be one of {', '.join(SCOPES)}, got {a.scope!r}")
    if a.scope != "lm" and not is_adapted(cfg):
        raise ConfigError(f"adapter.scope={a.scope} needs adapter.method lorta or lora (it is {a.method})")
    parse_parts(cfg.model.trainable)
    if a.method == "lorta":
        try:
            LoRTAConfig(rank=int(a.rank), alpha=float(a.alpha) or None, modes=parse_modes(a.modes))
        except AdapterConfigError as exc:
            raise ConfigError(f"adapter.modes={a.modes!r}: {exc}") from exc
    if cfg.data.source not in ("demo", "openfold", "dir"):
        raise ConfigError(f"data.source must be demo, openfold or dir; got {cfg.data.source!r}")
    check_run_keys(cfg)


def check_new_run(cfg: mlc.ConfigDict) -> None:
    """What only a new run must satisfy: a frozen trunk has to come from a pretrained ESMFold."""
    if "trunk" not in parse_parts(cfg.model.trainable) and not cfg.model.init_from:
        raise ConfigError("model.trainable leaves the trunk frozen, but model.init_from names no pretrained ESMFold: "
                          "the run would adapt a random trunk (set model.init_from=esmfold_3B_v1.pt, or train the "
                          f"trunk: model.trainable={RETRAIN_PARTS})")
