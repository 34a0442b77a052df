"""Experiment loggers beside `metrics.jsonl`, which stays the run's source of truth.

    train.loggers = "tensorboard,wandb,csv"      (scripts: --log tensorboard --log wandb)

* `tensorboard`: event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`), one
  scalar per number of every metrics record: `train/loss`, `train/lr`, `val/lddt_ca`, …, at the
  record's step. A resumed run purges the events after its checkpoint's step, as metrics.jsonl drops
  its records after it. Needs the `tensorboard` package (`pip install tensorboard`).
* `wandb`: Weights & Biases in offline mode under RUN/wandb/ (`wandb sync RUN/wandb/offline-run-*`
  uploads it later); a resumed run continues the same W&B run. Needs the `wandb` package.
* `csv`: RUN/metrics.csv, rewritten from metrics.jsonl at every checkpoint and at the end (one row
  per record, nested keys flattened as `val/lddt_ca`).

A logger asked for whose package is missing is refused before the run starts, in one line.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import atomic_write
from .errors import ConfigError, UserError

log = logging.getLogger("esmfold_peft.run")

LOGGERS = ("tensorboard", "wandb", "csv")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_loggers(text: str) -> tuple[str, ...]:
    """`train.loggers` ("tensorboard,wandb", "" for none) as a tuple; unknown names refused."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in str(text or "").split(",") if n.strip()))
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ConfigError(f"train.loggers: unknown logger(s) {', '.join(bad)}; choose among {', '.join(LOGGERS)}")
    return names


def check_loggers(names: Iterable[str]) -> None:
    """UserError naming the package to install when a logger asked for cannot be imported."""
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"--log {name}: the {package} package is not installed (pip install {package})")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics record: a step's under `train/`, a section's (`val`, `eval`) under its name,
    deeper keys joined by '/': {"train/loss": 1.2, "val/lddt_ca": 0.21}."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_numbers(value, key))
        else:
            out.update(_numbers({key: value}, "train"))
    return out


def _numbers(values: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Logger:
    def log(self, record: dict) -> None:
        """One metrics record (as appended to metrics.jsonl)."""

    def flush(self) -> None:
        """At every checkpoint."""

    def close(self) -> None:
        """At the end of the session."""


class TensorBoardLogger(Logger):
    def __init__(self, run_path: Path, config: dict, purge_from: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_path) / "tensorboard"), purge_step=purge_from)
        if not purge_from:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    def __init__(self, run_path: Path, config: dict):
        import wandb

        run_path = Path(run_path)
        id_file = run_path / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id = wandb.util.generate_id()
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(mode="offline", dir=str(run_path), project="esmfold-peft", name=run_path.name,
                              id=run_id, resume="allow", config=config)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class CsvLogger(Logger):
    """metrics.csv, regenerated from metrics.jsonl (so it follows a resume's truncation exactly)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def flush(self) -> None:
        rows = [{"step": r.get("step"), **scalars(r)} for r in self.run_dir.read_metrics()]
        columns = list(dict.fromkeys(k for row in rows for k in row))

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.run_dir.path / "metrics.csv", write)

    close = flush


def open_loggers(names: Iterable[str], run_dir, config: dict, purge_from: Optional[int]) -> list[Logger]:
    """The loggers `names` asks for, opened on the run directory (`run_dir`: a RunDir); `purge_from`: a resumed
    run's first step to log again (what an earlier session logged from there on is dropped), None for a new run."""
    out: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardLogger(run_dir.path, config, purge_from))
        elif name == "wandb":
            out.append(WandbLogger(run_dir.path, config))
        elif name == "csv":
            out.append(CsvLogger(run_dir))
    if out:
        log.info("logging to %s as well as %s", ", ".join(names), run_dir.metrics)
    return out
