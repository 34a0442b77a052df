"""The run directory: one written contract shared by every application (folding, NLP).

    RUN/config.json            the fully resolved configuration (paths portable, see `store_path`)
    RUN/summary.json           a typed record: schema version, status, exit code, reason, results
    RUN/metrics.jsonl          one JSON object per line, appended; a torn last line is dropped on read
    RUN/train.log              the log of every session of the run
    RUN/checkpoints/last.pt    everything needed to resume exactly (+ last.pt.sha256)
    RUN/checkpoints/best.pt    the checkpoint of the best validation score (+ best.pt.sha256)
    RUN/model/, RUN/adapter/   the exported result (weight files with .sha256 sidecars)

Statuses and exit codes are the ones of `errors`. A run that fails to start is marked `failed`
with its reason; a new run may then reuse the directory. A directory holding any other run is
refused unless the run is resumed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import remove_stale_temporaries, write_json_atomic
from .artifacts import read_json
from .errors import (COMPLETED, FAILED, STATUS_EXIT, STATUSES, ArtifactError, OutputPathError, UserError,
                     describe_os_error)

log = logging.getLogger("esmfold_peft.run")

SCHEMA_VERSION = 1
CONFIG, SUMMARY, METRICS, LOG = "config.json", "summary.json", "metrics.jsonl", "train.log"
CHECKPOINTS, LAST, BEST = "checkpoints", "last.pt", "best.pt"
RUN_PLACEHOLDER, PROJECT_PLACEHOLDER = "{run}", "{project}"


@dataclass
class RunSummary:
    """What summary.json holds: the common record, then the application's own results (flattened)."""

    application: str
    status: str
    steps: int = 0
    target_steps: int = 0
    wall_time_s: float = 0.0
    reason: Optional[str] = None  # why the run failed, diverged or stopped
    results: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        if self.status not in STATUSES:
            raise ValueError(f"unknown run status {self.status!r}")
        record = {k: v for k, v in asdict(self).items() if k != "results"}
        record["exit_code"] = STATUS_EXIT.get(self.status)
        record["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        clash = set(record) & set(self.results)
        if clash:
            raise ValueError(f"results may not reuse the summary's own keys: {sorted(clash)}")
        return {**record, **self.results}


class RunDir:
    """Paths and reads/writes of one run directory (see the module docstring)."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)

    config = property(lambda self: self.path / CONFIG)
    summary = property(lambda self: self.path / SUMMARY)
    metrics = property(lambda self: self.path / METRICS)
    log_file = property(lambda self: self.path / LOG)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    last_checkpoint = property(lambda self: self.path / CHECKPOINTS / LAST)
    best_checkpoint = property(lambda self: self.path / CHECKPOINTS / BEST)
    model_dir = property(lambda self: self.path / "model")
    adapter_dir = property(lambda self: self.path / "adapter")

    # --- lifecycle ------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        return self.config.exists() or self.last_checkpoint.exists()

    def status(self) -> Optional[str]:
        if not self.summary.is_file():
            return None
        try:
            return self.read_summary().get("status")
        except ArtifactError:
            return None

    def check_new(self) -> bool:
        """Before a new run: the folder can hold it. True when a failed start is being replaced."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputPathError(f"{self.path}: exists and is not a directory")
        if not self.holds_run():
            ensure_writable_dir(self.path)
            return False
        if self.status() == FAILED and not self.last_checkpoint.exists():
            return True
        raise UserError(f"{self.path} already holds a run (status: {self.status() or 'unknown'}); "
                        "continue it with --resume, or choose another --out")

    def check_resumable(self) -> None:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such run directory")
        if not self.config.exists():
            raise UserError(f"{self.path} is not a run directory (no {CONFIG})")
        if self.status() == COMPLETED and self.last_checkpoint.exists():
            log.info("the run in %s is complete; --steps beyond its target continues it", self.path)

    def start(self, config: dict, replace_failed: bool = False) -> None:
        """Create the folder and write the resolved config (an earlier failed start's files go first)."""
        ensure_writable_dir(self.path)
        if replace_failed:
            for name in (SUMMARY, METRICS):
                (self.path / name).unlink(missing_ok=True)
        self.write_config(config)

    def clean_temporaries(self) -> int:
        """Temporaries left by a writer killed mid-write (checkpoints, JSON): they are never valid."""
        removed = 0
        for folder, names in ((self.checkpoints, (LAST, LAST + ".sha256", BEST, BEST + ".sha256")),
                              (self.path, (CONFIG, SUMMARY))):
            if folder.is_dir():
                removed += sum(remove_stale_temporaries(folder, n) for n in names)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write", removed)
        return removed

    # --- config, summary, metrics ---------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config, config)

    def read_config(self) -> dict:
        data = read_json(self.config, dict, "run config")
        if not data:
            raise ArtifactError(self.config, "empty configuration")
        return data

    def write_summary(self, summary: RunSummary) -> dict:
        record = summary.to_dict()
        write_json_atomic(self.summary, record)
        return record

    def read_summary(self) -> dict:
        data = read_json(self.summary, dict, "run summary")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ArtifactError(self.summary, f"schema_version {version!r}; this version reads up to {SCHEMA_VERSION}")
        if data.get("status") not in STATUSES:
            raise ArtifactError(self.summary, f"unknown status {data.get('status')!r}")
        return data

    def append_metrics(self, record: dict) -> None:
        """One line per record; a line torn by a kill is dropped by `read_metrics`, never fatal."""
        line = json.dumps(record, default=float, allow_nan=True)
        self._heal_metrics_tail()
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def _heal_metrics_tail(self) -> None:
        """A file not ending in a newline was torn mid-line: cut the torn line so appends stay parsable."""
        try:
            with open(self.metrics, "rb+") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    return
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) == b"\n":
                    return
                fh.seek(0)
                data = fh.read()
                fh.seek(0)
                fh.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            return

    def read_metrics(self) -> list[dict]:
        """Every complete record; lines that do not parse are skipped with one warning."""
        if not self.metrics.is_file():
            return []
        records, bad = [], 0
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
        if bad:
            log.warning("%s: skipped %d damaged line(s)", self.metrics, bad)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Keep records up to `step` (those after a checkpoint are written again on resume)."""
        if not self.metrics.exists():
            return
        keep = [r for r in self.read_metrics() if isinstance(r.get("step"), int) and r["step"] <= step]
        text = "".join(json.dumps(r, default=float) + "\n" for r in keep)
        write_json_text(self.metrics, text)


def write_json_text(path: Path, text: str) -> None:
    from ..atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or raise OutputPathError with the reason in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output directory {describe_os_error(exc, path)}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: output directory is not writable")
    return path


# --- portable paths -------------------------------------------------------------------------------

def project_root() -> Path:
    """The checkout holding this package (the folder with pyproject.toml), else the current folder."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def store_path(value: str, run_dir: Path, project_root: Path) -> str:
    """A path as the run's config stores it: `{run}/…` inside the run, `{project}/…` inside the project."""
    if not value or "{" in value:
        return value
    path = Path(value)
    if not path.is_absolute():
        return value
    for placeholder, root in ((RUN_PLACEHOLDER, Path(run_dir)), (PROJECT_PLACEHOLDER, Path(project_root))):
        try:
            rel = path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return f"{placeholder}/{rel.as_posix()}" if str(rel) != "." else placeholder
    return value


def resolve_path(value: str, run_dir: Optional[Path], project_root: Path) -> str:
    """The inverse of `store_path`: placeholders replaced by where the run and project are now."""
    if not isinstance(value, str) or "{" not in value:
        return value
    if RUN_PLACEHOLDER in value and run_dir is None:
        raise UserError(f"path {value!r} is relative to a run directory, and none is given")
    if run_dir is not None:
        value = value.replace(RUN_PLACEHOLDER, str(Path(run_dir)))
    return value.replace(PROJECT_PLACEHOLDER, str(Path(project_root)))


def map_paths(config: dict, keys: Iterable[str], fn) -> dict:
    """Apply `fn` to the dotted `keys` of a nested dict (missing keys are left alone)."""
    for key in keys:
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = fn(node[parts[-1]])
    return config
