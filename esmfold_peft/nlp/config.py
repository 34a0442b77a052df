"""The NLP harness's configuration: every knob with its reason, and what may change on resume.

Named configs (`configs/nlp_*.py`) start from `base_config()` and change what their task needs.
`0` in optim.lr / adapter.alpha means "the method's default" and is resolved before the run's
config.json is written, so a run directory always records the values it trained with.
"""

from __future__ import annotations

import copy
from pathlib import Path

import ml_collections as mlc

from ..runtime.config import apply_overrides, describe_differences, differences, load_config_file
from ..runtime.errors import ConfigError
from ..runtime.loop import check_run_keys
from ..runtime.rundir import project_root
from .glue import TASKS
from .models import METHODS

LM_TASKS = ("alpaca", "dpo")
ALL_TASKS = tuple(TASKS) + LM_TASKS
# the config each task starts from when --config is not given
DEFAULT_CONFIG = {**{t: "nlp_classify" for t in TASKS}, "alpaca": "nlp_instruct", "dpo": "nlp_dpo"}
# what a resumed run may change: the target, the cadence of logs/evaluations/checkpoints, where it runs
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep",
                     "train.loggers", "train.device", "train.num_threads", "eval.batch_size")
# keys newer than the first runs: a stored config without them takes the default
ADDED_LATER = ("train.keep", "train.loggers")


def base_config() -> mlc.ConfigDict:
    cfg = mlc.ConfigDict()
    cfg.name = "base"
    cfg.task = "rt-polarity"  # a classification task, alpaca (instruction tuning) or dpo (preferences)

    cfg.model = mlc.ConfigDict()
    cfg.model.name = "minilm"  # minilm | smollm2 | a Hugging Face checkpoint folder | random
    cfg.model.max_length = 64  # tokens per example (pairs: both texts together)
    cfg.model.random = mlc.ConfigDict()  # the network for name=random (tests, smoke runs)
    cfg.model.random.family = "bert"  # bert | roberta | llama | mpnet
    cfg.model.random.hidden_size = 32
    cfg.model.random.num_layers = 2
    cfg.model.random.num_heads = 4
    cfg.model.random.num_kv_heads = 0  # llama: fewer key/value heads = grouped-query attention (0 = num_heads)
    cfg.model.random.intermediate_size = 64

    cfg.adapter = mlc.ConfigDict()
    cfg.adapter.method = "lorta"  # lorta | lora | none (head only; classification) | full
    cfg.adapter.rank = 4
    cfg.adapter.alpha = 0.0  # update scale alpha/rank; 0 = adapter.default_alpha_per_rank × rank
    cfg.adapter.default_alpha_per_rank = 2.0
    cfg.adapter.modes = ("heads", "matrices", "layers")  # LoRTA's tensorised modes (paper Table 2)
    cfg.adapter.targets = ("q", "k", "v", "o")
    cfg.adapter.dropout = 0.0

    cfg.data = mlc.ConfigDict()
    cfg.data.root = ""  # cache of the offline defaults ('' = <project>/data/nlp)
    cfg.data.path = ""  # the task's data file ('' = the offline default): Alpaca JSON, preference JSON(L), …
    cfg.data.glue_dir = ""  # GLUE's distribution folder (CoLA/, SST-2/, …) for the GLUE tasks
    cfg.data.max_train = 0  # training examples kept (0 = all), a fixed label-blind sample
    cfg.data.max_eval = 0  # held-out examples kept per evaluation set (0 = all)
    cfg.data.eval_fraction = 0.2  # held-out share where the data has no split of its own

    cfg.optim = mlc.ConfigDict()
    cfg.optim.lr = 0.0  # adapter (or full model) learning rate; 0 = optim.default_lr[method]
    cfg.optim.default_lr = mlc.ConfigDict({"lorta": 1e-2, "lora": 1e-3, "full": 5e-5, "none": 0.0})
    cfg.optim.head_lr = 4e-3  # the classification head's (paper Table 3: separate rates)
    cfg.optim.weight_decay = 0.0
    cfg.optim.betas = (0.9, 0.999)
    cfg.optim.eps = 1e-8
    cfg.optim.schedule = "linear"  # linear | cosine | constant, after warm-up (over train.steps)
    cfg.optim.warmup_ratio = 0.06  # share of train.steps (paper: 0.06)
    cfg.optim.clip_grad_norm = 1.0  # 0 = no clipping

    cfg.train = mlc.ConfigDict()
    cfg.train.steps = 200
    cfg.train.batch_size = 16  # examples (pairs for DPO) per optimizer step
    cfg.train.micro_batch_size = 0  # split a step into micro-batches of this many (0 = one), for memory
    cfg.train.seed = 0
    cfg.train.log_every = 10
    cfg.train.eval_every = 0  # held-out evaluation every N steps (0 = only at the start and the end)
    cfg.train.ckpt_every = 50
    cfg.train.device = "auto"
    cfg.train.num_threads = 0  # torch CPU threads (0 = torch's choice)
    cfg.train.diverge_loss_threshold = 1e4  # a loss above this (or non-finite) stops the run: exit 3
    cfg.train.keep = "best"  # what adapter/ (model/) holds at the end: best (the task's primary metric) or last
    cfg.train.loggers = ""  # besides metrics.jsonl: tensorboard, wandb, csv (comma-separated)

    cfg.eval = mlc.ConfigDict()
    cfg.eval.batch_size = 64
    cfg.eval.generations = 3  # instruction tuning: held-out prompts answered at the start and the end
    cfg.eval.max_new_tokens = 48

    cfg.dpo = mlc.ConfigDict()
    cfg.dpo.beta = 0.1
    cfg.dpo.max_prompt_length = 64  # prompts are cut from the left (their end is kept)
    cfg.dpo.precompute_reference = True  # reference log-probs once, cached in the run; False: every step
    return cfg


def configs_dir() -> Path:
    return project_root() / "configs"


def load_config(name: str) -> mlc.ConfigDict:
    return load_config_file(name, configs_dir())


def resolve_defaults(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
    """Fill the '0 = default' values and check the choices that overrides cannot type-check."""
    if cfg.task not in ALL_TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}; known: {', '.join(ALL_TASKS)}")
    method = cfg.adapter.method
    if method not in METHODS:
        raise ConfigError(f"adapter.method must be one of {', '.join(METHODS)}, got {method!r}")
    if cfg.task in LM_TASKS and method == "none":
        raise ConfigError(f"adapter none trains nothing on task {cfg.task} (it has no head); "
                          "use lorta, lora or full")
    if not cfg.optim.lr:
        if method not in cfg.optim.default_lr:
            raise ConfigError(f"optim.default_lr has no entry for {method}; set optim.lr")
        cfg.optim.lr = float(cfg.optim.default_lr[method])
    if not cfg.adapter.alpha:
        cfg.adapter.alpha = float(cfg.adapter.default_alpha_per_rank * cfg.adapter.rank)
    if cfg.optim.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.schedule must be linear, cosine or constant, got {cfg.optim.schedule!r}")
    for key in ("steps", "batch_size", "log_every"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {cfg.train[key]}")
    check_run_keys(cfg)
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not a multiple of "
                          f"train.micro_batch_size={cfg.train.micro_batch_size}")
    return cfg


def config_for_resume(stored: dict, overrides: list[str]) -> mlc.ConfigDict:
    """The stored config with the given overrides; a change outside RESUME_MAY_CHANGE is refused, by name."""
    stored = copy.deepcopy(stored)
    defaults = base_config()
    for key in ADDED_LATER:
        section, leaf = key.rsplit(".", 1)
        stored.setdefault(section, {}).setdefault(leaf, defaults[section][leaf])
    base = mlc.ConfigDict(stored)
    requested = apply_overrides(mlc.ConfigDict(stored), overrides)
    refused = [d for d in differences(base, requested) if d[0] not in RESUME_MAY_CHANGE]
    if refused:
        raise ConfigError("cannot resume with a different " + describe_differences(refused)
                          + f" (a resumed run may change only {', '.join(RESUME_MAY_CHANGE)})")
    return requested
