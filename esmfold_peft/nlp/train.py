"""Training an NLP task: the task the config names, on the shared run loop (`runtime.loop`).

    status = train(cfg, "runs/rt-lorta")          # 0 completed, 3 diverged, 130 interrupted

The run contract (config, summary, metrics, checkpoints, the best model, loggers, resume, exit
statuses) is the loop's, the same as for folding runs; what an NLP task adds is in `tasks.Task`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import ml_collections as mlc
import torch

from ..runtime.errors import ConfigError
from ..runtime.loop import run_training
from ..runtime.session import StopSignal
from .glue import TASKS
from .instruct import InstructionTask
from .preference import PreferenceTask
from .tasks import ClassificationTask, Task

LM_TASKS = {"alpaca": InstructionTask, "dpo": PreferenceTask}


def task_for(cfg: mlc.ConfigDict, device: Optional[torch.device] = None) -> Task:
    """The task `cfg.task` names: a GLUE-style classification, alpaca (instructions) or dpo (preferences)."""
    if cfg.task in LM_TASKS:
        return LM_TASKS[cfg.task](cfg, device)
    if cfg.task in TASKS:
        return ClassificationTask(cfg, device)
    raise ConfigError(f"unknown task {cfg.task!r}; known: {', '.join(list(TASKS) + list(LM_TASKS))}")


def train(cfg: mlc.ConfigDict, out_dir: Path, resume: bool = False, progress: bool = True,
          stop: Optional[StopSignal] = None) -> int:
    """Train cfg's task into the run directory `out_dir`; return the exit status (0, 3 or 130).

    With `resume`, `cfg` must be the run's stored config (with permitted changes, see
    `config.config_for_resume`); a run stopped before its first checkpoint starts again from step 0.
    `stop` replaces the signal handler (tests).
    """
    return run_training(task_for(cfg), out_dir, resume=resume, progress=progress, stop=stop)
