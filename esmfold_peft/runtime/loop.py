"""THE run loop: one run contract for every application (folding, NLP), written once.

    status = run_training(FoldTask(cfg), out_dir, resume=False, progress=True)   # 0, 3 or 130

The loop owns the run directory's life: status, resume, signals, divergence, checkpoints, the best
model, the summary, metrics, loggers, progress and the processes of a torchrun job. A task (a
`TrainingTask`) owns what differs between applications: building data and model (`setup`), one
optimizer step (`train_step`), validation (`validate`), what its checkpoints hold (`save`,
`load_weights`) and what it exports (`export`).

One step s -> s+1, in this order (so a run killed anywhere and resumed ends bitwise equal to a
straight run):

    the step (a signal waits for its end) -> a metrics record and a train.log line every log_every
    steps -> validation every val_every steps and at the last step -> a checkpoint every ckpt_every
    steps, at the last step, at a new best validation score (then copied to checkpoints/best.pt), and
    when a stop was asked -> stop if asked

At the end the model the run keeps (`train.keep`: the best validation score by default, or the
last) is exported and the summary says which, with the best and the last scores and their steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .artifacts import copy_checksummed, recorded_checksums
from .errors import (COMPLETED, DIVERGED, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, FAILED, INTERRUPTED, RUNNING,
                     ConfigError, UserError)
from .loggers import check_loggers, open_loggers, parse_loggers
from .progress import Progress, duration
from .rundir import RunDir, RunSummary
from .session import Dist, StopSignal, remove_file_logging, setup_distributed, setup_file_logging, \
    teardown_distributed

log = logging.getLogger("esmfold_peft.run")
steps_log = logging.getLogger("esmfold_peft.steps")
KEEP = ("best", "last")  # train.keep: which model a finished run exports


def check_run_keys(cfg) -> None:
    """The loop's own config keys, checked when a config is resolved: train.keep and train.loggers."""
    if cfg.train.get("keep", "best") not in KEEP:
        raise ConfigError(f"train.keep must be best or last, got {cfg.train.keep!r}")
    parse_loggers(cfg.train.get("loggers", ""))


@dataclass
class Schedule:
    """What the loop reads of a task's config: the run's length and cadence, and what it keeps and logs."""

    steps: int
    log_every: int
    val_every: int  # 0: validation only at the start and the end
    ckpt_every: int  # 0: a checkpoint only at the end (and at a new best)
    keep: str = "best"
    loggers: str = ""

    @classmethod
    def of(cls, train, val_every: int) -> "Schedule":
        """A task's `cfg.train` section (its validation cadence named as the application names it)."""
        return cls(train.steps, train.log_every, val_every, train.ckpt_every, train.get("keep", "best"),
                   train.get("loggers", ""))

    def check(self) -> tuple[str, ...]:
        if self.keep not in KEEP:
            raise ConfigError(f"train.keep must be best or last, got {self.keep!r}")
        return parse_loggers(self.loggers)


@dataclass
class StepResult:
    """One optimizer step: its loss terms (averaged over its examples), for metrics and divergence."""

    terms: dict  # "loss" and its terms
    grad_norm: Optional[float] = None
    scalars: dict = field(default_factory=dict)  # more numbers for the metrics record (lr, recycles, …)
    divergence: Optional[str] = None  # why the step diverged (then no update was made)


@dataclass
class Context:
    """Where a task runs: its run directory, process place and device, and whether bars are shown."""

    run: RunDir
    d: Dist
    device: object
    progress: bool


class TrainingTask:
    """What an application gives the loop (the folding task, the NLP tasks). See the module docstring."""

    application = ""  # summary.json's `application`
    metrics_key = "val"  # validation records in metrics.jsonl: {"step": s, metrics_key: {...}}
    monitor = ""  # the validation metric that selects the best model
    monitor_label = ""  # how logs name it (default: the metric's key)
    higher_is_better = True
    distributed = False  # may run as several processes under torchrun

    def __init__(self, cfg):
        self.cfg = cfg

    def schedule(self) -> Schedule:
        raise NotImplementedError

    def description(self) -> str:
        """The progress bar's label."""
        return self.application

    def device_name(self) -> str:
        return self.cfg.train.device

    def prepare(self, run: RunDir, resume: bool) -> dict:
        """Main process, before anything is built: check the config for a new or resumed run; return what
        RUN/config.json stores."""
        raise NotImplementedError

    def setup(self, ctx: Context, checkpoint: Optional[Path]) -> Optional[tuple[int, dict]]:
        """Build data, model and optimizer; with a `checkpoint`, restore it and return (its step, its extra)."""
        raise NotImplementedError

    def before_training(self, run: RunDir, extra: dict) -> None:
        """After set-up and restore, once per session."""

    def train_step(self, step: int) -> StepResult:
        raise NotImplementedError

    def validate(self) -> Optional[dict]:
        """The validation metrics (main process), or None when there is no validation data."""
        return None

    def describe_validation(self, res: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))

    def save(self, path: Path, step: int, extra: dict) -> None:
        """A checkpoint: everything to resume exactly at `step` (with the loop's `extra`)."""
        raise NotImplementedError

    def load_weights(self, path: Path) -> None:
        """A checkpoint's trained weights into the model (the best model at the end of a run)."""
        raise NotImplementedError

    def after_training(self, run: RunDir, extra: dict) -> dict:
        """With the kept model, before export: more results for the summary."""
        return {}

    def export(self, run: RunDir) -> list:
        """Write the kept model; the paths written."""
        return []

    def results(self, initial: Optional[dict], final: Optional[dict]) -> dict:
        """The application's own fields of summary.json (`initial`, `final`: validation metrics)."""
        return {}

    def plot(self, run: RunDir) -> None:
        """The run's curves from metrics.jsonl."""

    def model(self):
        """The trained model as this process holds it (None before set-up)."""
        return None


def run_training(task: TrainingTask, out_dir: Path, resume: bool = False, progress: bool = True,
                 stop: Optional[StopSignal] = None) -> int:
    """Train `task` in the run directory `out_dir`; return the exit status (0 done, 3 diverged, 130 interrupted).

    A fault in the inputs (UserError) marks a run that has no checkpoint failed, with its reason, and
    propagates. `stop` replaces the signal handler (tests).
    """
    return Loop(task, RunDir(out_dir), resume, progress, stop).run()


class Loop:
    def __init__(self, task: TrainingTask, run: RunDir, resume: bool, progress: bool, stop: Optional[StopSignal]):
        self.task, self.run_dir, self.resume, self.progress = task, run, resume, progress
        self.stop = stop or StopSignal()
        self.schedule = task.schedule()
        self.d, self.device = Dist(), None
        self.step = self.saved_step = 0
        self.extra = {"val_initial": None, "val_last": None, "best": None, "wall_before": 0.0}
        self.started = time.time()
        self.file_log = None
        self.loggers = []
        self.ready = self.in_step = False  # set-up done (a checkpoint can be written); inside a step
        self.bar: Optional[Progress] = None

    # --- the session -------------------------------------------------------------------------------

    def run(self) -> int:
        names = self.schedule.check()
        check_loggers(names)
        if self.task.distributed:
            self.d, self.device = setup_distributed(self.task.device_name())
        else:
            from .session import resolve_device, world_size

            if world_size() > 1:
                raise UserError(f"the {self.task.application} harness runs in one process; start it without torchrun")
            self.device = resolve_device(self.task.device_name())
        finished = False
        try:
            if self.d.main:
                self._begin()
            with self.stop:
                self._setup(names)
                status = self._train()
                finished = True
                return status
        except KeyboardInterrupt:
            self._interrupted()
            return EXIT_INTERRUPTED
        except UserError as exc:
            self._failed(str(exc))
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            for logger in self.loggers:
                logger.close()
            if self.file_log is not None:
                remove_file_logging(self.file_log)
            teardown_distributed(synchronize=finished)

    def _begin(self) -> None:
        """Main process: the folder can hold this run; the config is written; train.log opens."""
        run = self.run_dir
        replace_failed = run.check_resumable() if self.resume else run.check_new()
        stored = self.task.prepare(run, self.resume)
        run.clean_temporaries()
        run.start(stored, replace_failed=bool(replace_failed))
        self.file_log = setup_file_logging(run.log_file)

    def _setup(self, names) -> None:
        run, ckpt = self.run_dir, None
        if self.resume and run.last_checkpoint.exists():
            ckpt = run.last_checkpoint
        if self.d.world > 1:
            dist.barrier()  # the run directory exists before any process reads or writes in it
        restored = self.task.setup(Context(run, self.d, self.device, self.progress), ckpt)
        if restored is not None:
            self.step, extra = restored
            self.saved_step = self.step
            self.extra.update(extra)
            if self.d.main:
                log.info("resumed from %s at step %d", run.last_checkpoint, self.step)
                self._repair_best()
        if self.step > self.schedule.steps:
            raise UserError(f"the run is at step {self.step}; --steps {self.schedule.steps} would go back (give more)")
        self.ready = True
        self.task.before_training(run, self.extra)
        if self.d.main:  # records after the checkpoint (all of them without one) are written again
            run.truncate_metrics(self.step if restored is not None else -1)
            purge = (self.step + 1 if restored is not None else 0) if self.resume else None
            self.loggers = open_loggers(names, run, self.task.cfg.to_dict(), purge)

    def _train(self) -> int:
        s, run = self.schedule, self.run_dir
        if self.resume and self.step >= s.steps and run.status() == COMPLETED:
            log.info("%s is already complete at step %d (give --steps N to train further)", run.path, self.step)
            return EXIT_OK
        if self.d.main:
            self._summary(RUNNING)
        if self.step == 0 and self.extra["val_initial"] is None:
            self.extra["val_initial"] = self._validate("initial")
        self.bar = Progress(s.steps, self.task.description(), initial=min(self.step, s.steps),
                            enabled=self.progress and self.d.main, unit="step", every=None)
        session = (time.time(), self.step)
        divergence = None
        while self.step < s.steps and divergence is None:
            divergence = self._one_step(session)
        self.bar.close()
        if divergence is not None:
            return self._end(DIVERGED, divergence=divergence)
        last = self.extra.get("val_last") or {}
        if last.get("step") != self.step and self._validate("final") is not None:  # resumed after the last step
            self._save_if(new_best=self._is_best_now())
        return self._end(COMPLETED)

    def _one_step(self, session: tuple[float, int]) -> Optional[dict]:
        s = self.schedule
        with self.stop.deferred():  # a signal here finishes the step, checkpoints and stops
            self.in_step = True
            t0 = time.time()
            res = self.task.train_step(self.step)
            if res.divergence is not None:
                log.error("diverged at step %d: %s; the last good checkpoint is kept", self.step, res.divergence)
                return {"step": self.step, "rule": res.divergence, "terms": res.terms}
            self.step += 1
            dt = time.time() - t0
            self.bar.update(1, loss=f"{res.terms['loss']:.4f}", s_per_step=f"{dt:.2f}")
            if self.d.main and (self.step % s.log_every == 0 or self.step == s.steps):
                self._record({"step": self.step, **{k: round(v, 6) for k, v in res.terms.items()}, **res.scalars,
                              "grad_norm": res.grad_norm, "sec_per_step": round(dt, 4)})
                self._step_line(res, session)
            self.in_step = False
        new_best = False
        if self.step == s.steps or (s.val_every and self.step % s.val_every == 0):
            if self._validate("final" if self.step == s.steps else "periodic") is not None:
                new_best = self._is_best_now()
        with self.stop.deferred():
            due = (s.ckpt_every and self.step % s.ckpt_every == 0) or self.step == s.steps or self.stop.requested
            self._save_if(new_best, due)
        if self.stop.requested and self.step < s.steps:
            raise KeyboardInterrupt
        return None

    # --- validation and the best model ---------------------------------------------------------------

    def _validate(self, tag: str) -> Optional[dict]:
        if not self.d.main:
            return None
        t0 = time.time()
        res = self.task.validate()
        if res is None:
            return None
        log.info("validation (%s, step %d, %.1f s): %s", tag, self.step, time.time() - t0,
                 self.task.describe_validation(res))
        self._record({"step": self.step, self.task.metrics_key: res})
        if tag != "initial":
            self.extra["val_last"] = {"step": self.step, "metrics": res}
        return res

    def _is_best_now(self) -> bool:
        """Whether the validation just made (at this step) beats the best so far; if so it becomes the best."""
        value = _finite((self.extra["val_last"] or {}).get("metrics", {}).get(self.task.monitor))
        if value is None:
            return False
        best = self.extra.get("best")  # a tie goes to the later, more trained model
        if best is not None and not (value >= best["value"] if self.task.higher_is_better else value <= best["value"]):
            return False
        self.extra["best"] = {"step": self.step, "value": value, "metric": self.task.monitor}
        return True

    def _save_if(self, new_best: bool, due: bool = False) -> None:
        """A checkpoint when one is due or a new best was found (then best.pt becomes a copy of it)."""
        if new_best or (due and self.saved_step != self.step):
            self._save()
        if new_best and self.d.main:
            copy_checksummed(self.run_dir.last_checkpoint, self.run_dir.best_checkpoint)

    def _save(self) -> None:
        self.extra["wall_before"] += time.time() - self.started
        self.started = time.time()
        if self.d.main:
            self.task.save(self.run_dir.last_checkpoint, self.step, self.extra)
            for logger in self.loggers:
                logger.flush()
        self.saved_step = self.step

    def _repair_best(self) -> None:
        """A run killed between writing a new best's checkpoint and copying it: copy it now."""
        best, run = self.extra.get("best"), self.run_dir
        if best is None:
            return
        if best["step"] == self.step:
            if recorded_checksums(run.best_checkpoint)[:1] != recorded_checksums(run.last_checkpoint)[:1] or \
                    not run.best_checkpoint.is_file():
                copy_checksummed(run.last_checkpoint, run.best_checkpoint)
        elif not run.best_checkpoint.is_file():
            log.warning("%s is missing: the best model (step %d) is lost; the next best replaces it",
                        run.best_checkpoint, best["step"])
            self.extra["best"] = None

    def _kept(self) -> tuple[str, int]:
        """Put the model the run keeps into the task's model (train.keep); return (which, its step)."""
        best, last = self.extra.get("best"), self.extra.get("val_last")
        metric = self.task.monitor_label or self.task.monitor
        if best is None or best["step"] == self.step:
            return ("best" if best is not None else "last"), self.step
        last_value = _finite((last or {}).get("metrics", {}).get(self.task.monitor))
        if self.schedule.keep == "last":
            log.warning("train.keep=last: the exported model is step %d's (%s %s), not the best, step %d's (%s %.4f)",
                        self.step, metric, _fmt(last_value), best["step"], metric, best["value"])
            return "last", self.step
        self.task.load_weights(self.run_dir.best_checkpoint)
        log.info("kept the best model, step %d's (%s %.4f); the last, step %d's, scored %s (train.keep=last keeps "
                 "the last)", best["step"], metric, best["value"], self.step, _fmt(last_value))
        return "best", best["step"]

    # --- the end ---------------------------------------------------------------------------------------

    def _end(self, status: str, divergence: Optional[dict] = None) -> int:
        more, kept = {}, None
        if status == COMPLETED and self.d.main:
            kept = self._kept()
            more = self.task.after_training(self.run_dir, self.extra)
            more["exported"] = [str(p) for p in self.task.export(self.run_dir)]
        if self.d.main:
            record = self._summary(status, divergence=divergence, kept=kept, more=more,
                                   reason=divergence["rule"] if divergence else None)
            self._closing_line(record)
        if self.d.world > 1:
            dist.barrier()
        return EXIT_OK if status == COMPLETED else EXIT_DIVERGED

    def _interrupted(self) -> None:
        if not self.d.main or not self.run_dir.config.exists():
            return
        if self.ready and self.d.world == 1 and self.step > self.saved_step and not self.in_step:
            self._save()  # under torchrun only a step's end is a safe point: the last periodic checkpoint stays
        reason = f"interrupted at step {self.step}; continue with --resume"
        log.warning("%s", reason)
        self._summary(INTERRUPTED, reason=reason)

    def _failed(self, reason: str) -> None:
        if self.d.main and self.run_dir.config.exists() and not self.run_dir.last_checkpoint.exists():
            self._summary(FAILED, reason=reason)

    def _summary(self, status: str, reason=None, divergence=None, kept=None, more=None) -> dict:
        metric = self.task.monitor
        initial = self.extra.get("val_initial")
        last = self.extra.get("val_last") or {}
        best = self.extra.get("best") or {}
        results = {
            **self.task.results(initial, last.get("metrics")),
            "processes": self.d.world, "diverged": status == DIVERGED, "divergence": divergence,
            "monitor": metric, "higher_is_better": self.task.higher_is_better,
            "best_step": best.get("step"), "best_value": best.get("value"),
            "last_step": last.get("step"), "last_value": _finite((last.get("metrics") or {}).get(metric)),
            "kept": kept[0] if kept else None, "kept_step": kept[1] if kept else None,
            **(more or {}),
        }
        wall = self.extra["wall_before"] + time.time() - self.started
        record = self.run_dir.write_summary(RunSummary(
            self.task.application, status, steps=self.step, target_steps=self.schedule.steps,
            wall_time_s=round(wall, 2), reason=reason, results=results))
        if status not in (RUNNING, FAILED):
            self.task.plot(self.run_dir)
        return record

    def _closing_line(self, record: dict) -> None:
        initial = _finite((self.extra.get("val_initial") or {}).get(self.task.monitor))
        text = f"wrote {self.run_dir.path} (status: {record['status']}"
        if record["last_value"] is not None:
            text += f", {self.task.monitor_label or self.task.monitor} {_fmt(initial)} -> {_fmt(record['last_value'])}"
        if record["kept"] == "best" and record["kept_step"] != self.step:
            text += f"; model/ holds the best, step {record['kept_step']}: {_fmt(record['best_value'])}"
        log.info("%s)", text)

    # --- metrics, loggers and log lines ------------------------------------------------------------------

    def _record(self, record: dict) -> None:
        self.run_dir.append_metrics(record)
        for logger in self.loggers:
            logger.log(record)

    def _step_line(self, res: StepResult, session: tuple[float, int]) -> None:
        s = self.schedule
        t0, first = session
        per_step = (time.time() - t0) / max(1, self.step - first)
        parts = [f"step {self.step}/{s.steps}", f"loss {res.terms['loss']:.4f}"]
        terms = [f"{k} {v:.4g}" for k, v in res.terms.items() if k != "loss"]
        if terms:
            parts[-1] += f" ({', '.join(terms[:4])})"
        if "lr" in res.scalars:
            parts.append(f"lr {res.scalars['lr']:.3g}")
        if res.grad_norm is not None:
            parts.append(f"grad norm {res.grad_norm:.3g}")
        parts.append(f"{per_step:.2f} s/step")
        if self.step < s.steps:
            parts.append(f"ETA {duration(per_step * (s.steps - self.step))}")
        text = " | ".join(parts)
        if self.bar is not None and self.bar.bar is not None and self.file_log is not None:
            self.file_log.handle(steps_log.makeRecord(steps_log.name, logging.INFO, __file__, 0, text, (), None))
        else:  # no bar on the console: the line is the progress there too
            steps_log.info("%s", text)


def _finite(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"

