"""The one run loop (runtime/loop.py): the best model, exact resume after a death at any moment, loggers, log lines.

A toy task drives the loop in milliseconds: one parameter w pulled by noisy SGD from 0 towards 1,
scored by -(w - 0.5)², so validation improves until w passes 0.5 and worsens after: the best model
is in the middle of the run, as in a real run that overfits or is extended too far.
"""

import json
import logging
import math

import pytest
import torch

from esmfold_peft.runtime import loop as loop_module
from esmfold_peft.runtime.artifacts import torch_load, torch_save
from esmfold_peft.runtime.errors import EXIT_OK, ConfigError, UserError
from esmfold_peft.runtime.loop import Schedule, StepResult, TrainingTask, run_training
from esmfold_peft.runtime.rundir import RunDir
from esmfold_peft.runtime.session import step_seed


class Cfg(dict):
    """The little of a ConfigDict the loop reads (`to_dict`, `train.device`)."""

    def __getattr__(self, key):
        return self[key]

    def to_dict(self):
        return json.loads(json.dumps(self))


class ToyTask(TrainingTask):
    application = "toy"
    monitor = "score"

    def __init__(self, steps=12, val_every=2, ckpt_every=0, keep="best", loggers="", lr=0.1):
        super().__init__(Cfg(train=Cfg(device="cpu", steps=steps, val_every=val_every, ckpt_every=ckpt_every,
                                       keep=keep, loggers=loggers, lr=lr)))

    def schedule(self):
        t = self.cfg.train
        return Schedule(t.steps, 1, t.val_every, t.ckpt_every, t.keep, t.loggers)

    def prepare(self, run, resume):
        return self.cfg.to_dict()

    def setup(self, ctx, checkpoint):
        self.w = torch.zeros(1, dtype=torch.float64)
        if checkpoint is None:
            return None
        ckpt = torch_load(checkpoint)
        self.w = ckpt["w"].clone()
        return ckpt["step"], ckpt["extra"]

    def train_step(self, step):
        noise = torch.randn(1, generator=torch.Generator().manual_seed(step_seed(0, step)), dtype=torch.float64)
        grad = 2 * (self.w - 1) + 0.1 * noise
        self.w = self.w - self.cfg.train.lr * grad
        return StepResult({"loss": float((self.w - 1) ** 2), "noise": float(noise)}, float(grad.abs()),
                          scalars={"lr": self.cfg.train.lr})

    def validate(self):
        return {"score": -float((self.w - 0.5) ** 2), "w": float(self.w)}

    def save(self, path, step, extra):
        torch_save({"w": self.w, "step": step, "extra": extra}, path)

    def load_weights(self, path):
        self.w = torch_load(path)["w"].clone()

    def export(self, run):
        run.model_dir.mkdir(parents=True, exist_ok=True)
        torch_save({"w": self.w}, run.model_dir / "w.pt")
        return [run.model_dir / "w.pt"]


def scores(run: RunDir) -> dict:
    return {r["step"]: r["val"]["score"] for r in run.read_metrics() if "val" in r}


def exported(run: RunDir) -> float:
    return float(torch_load(run.model_dir / "w.pt")["w"])


def test_the_best_model_is_kept_and_named_beside_the_last(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(), run.path, progress=False) == EXIT_OK
    s, val = run.read_summary(), scores(run)
    best_step = max((k for k in val if k > 0), key=lambda k: (val[k], k))
    assert 0 < best_step < 12 and val[12] < val[best_step]  # the run passed its best
    assert (s["best_step"], s["best_value"]) == (best_step, val[best_step])
    assert (s["last_step"], s["last_value"]) == (12, val[12])
    assert s["kept"] == "best" and s["kept_step"] == best_step and s["monitor"] == "score"
    best = torch_load(run.best_checkpoint)
    assert best["step"] == best_step and exported(run) == float(best["w"])
    assert float(torch_load(run.last_checkpoint)["w"]) != exported(run)

    kept_last = RunDir(tmp_path / "last")
    assert run_training(ToyTask(keep="last"), kept_last.path, progress=False) == EXIT_OK
    assert kept_last.read_summary()["kept"] == "last"
    assert exported(kept_last) == float(torch_load(kept_last.last_checkpoint)["w"])
    assert "not the best" in (kept_last.path / "train.log").read_text()


def test_extending_a_run_past_its_best_keeps_the_best_and_says_so(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(steps=2), run.path, progress=False) == EXIT_OK
    first = exported(run)
    assert run_training(ToyTask(steps=12), run.path, resume=True, progress=False) == EXIT_OK
    s, val = run.read_summary(), scores(run)
    assert val[12] < s["best_value"] and s["kept"] == "best" and s["kept_step"] < 12
    assert exported(run) == float(torch_load(run.best_checkpoint)["w"]) != float(torch_load(run.last_checkpoint)["w"])
    assert exported(run) != first  # the best of the longer run, not the first session's last
    log = (run.path / "train.log").read_text()
    assert f"kept the best model, step {s['kept_step']}'s" in log and "model/ holds the best" in log


def untimed(records: list) -> list:
    return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in records]


class Death(BaseException):
    """What kill -9 does to the loop: nothing after it runs (no handler of the loop catches it)."""


def die_at(monkeypatch, k: int):
    """Raise Death at the k-th of the loop's side effects (steps, validations, checkpoint and summary writes,
    metrics records, best-model copies); return the counter."""
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == k:
            raise Death

    def wrap(owner, name):
        real = getattr(owner, name)

        def wrapped(*a, **kw):
            tick()
            out = real(*a, **kw)
            tick()
            return out

        monkeypatch.setattr(owner, name, wrapped)

    for name in ("train_step", "validate", "save"):
        wrap(ToyTask, name)
    for name in ("append_metrics", "write_summary", "write_config"):
        wrap(RunDir, name)
    wrap(loop_module, "copy_checksummed")
    return calls


def test_a_death_at_any_moment_resumes_to_the_straight_run_best_model_included(tmp_path, monkeypatch):
    straight = RunDir(tmp_path / "straight")
    assert run_training(ToyTask(ckpt_every=3), straight.path, progress=False) == EXIT_OK
    want = straight.read_summary()
    moments = 0
    for k in range(1, 200):
        run = RunDir(tmp_path / f"k{k}")
        with monkeypatch.context() as m:
            calls = die_at(m, k)
            try:
                run_training(ToyTask(ckpt_every=3), run.path, progress=False)
                died = False
            except Death:
                died = True
        if not died:
            break  # k is past the last side effect
        moments += 1
        if not run.config.exists():
            assert run_training(ToyTask(ckpt_every=3), run.path, progress=False) == EXIT_OK
        else:
            assert run_training(ToyTask(ckpt_every=3), run.path, resume=True, progress=False) == EXIT_OK
        got = run.read_summary()
        for key in ("steps", "best_step", "best_value", "last_value", "kept", "kept_step", "status"):
            assert got[key] == want[key], (k, key)
        assert exported(run) == exported(straight), k
        assert torch_load(run.best_checkpoint)["w"].equal(torch_load(straight.best_checkpoint)["w"]), k
        assert untimed(run.read_metrics()) == untimed(straight.read_metrics()), k
        assert calls["n"] >= k
    assert moments > 40  # every step, validation and write of the run was a moment to die at


def test_a_missing_best_checkpoint_is_said_and_the_next_best_replaces_it(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(steps=8), run.path, progress=False) == EXIT_OK
    best = run.read_summary()["best_step"]
    assert best < 8
    run.best_checkpoint.unlink()
    (run.best_checkpoint.parent / "best.pt.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        assert run_training(ToyTask(steps=10), run.path, resume=True, progress=False) == EXIT_OK
    assert f"best model (step {best}) is lost" in caplog.text
    s = run.read_summary()
    assert s["best_step"] == 10 and torch_load(run.best_checkpoint)["step"] == 10


def test_bad_keep_and_logger_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.keep must be best or last"):
        run_training(ToyTask(keep="first"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="unknown logger.*tensorbored"):
        run_training(ToyTask(loggers="tensorbored"), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_logger_whose_package_is_missing_is_one_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"--log wandb: the wandb package is not installed \(pip install wandb\)"):
        run_training(ToyTask(loggers="wandb"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_hold_the_metrics_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(steps=6, loggers="tensorboard,csv"), run.path, progress=False) == EXIT_OK
    assert run_training(ToyTask(steps=8, loggers="tensorboard,csv"), run.path, resume=True,
                        progress=False) == EXIT_OK
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    records = run.read_metrics()
    want = {}
    for r in records:
        for key, value in r.items():
            if key == "step":
                continue
            for tag, v in ({f"train/{key}": value} if not isinstance(value, dict)
                           else {f"{key}/{k}": x for k, x in value.items()}).items():
                if isinstance(v, (int, float)) and v is not None:
                    want.setdefault(tag, []).append((r["step"], float(v)))
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, points)), tag
    rows = (run.path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + len(records)


def test_step_lines_reach_the_log_and_a_non_terminal_gets_no_bar(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(steps=5), run.path, progress=True) == EXIT_OK  # stderr is not a terminal here
    log = (run.path / "train.log").read_text()
    lines = [line for line in log.splitlines() if "esmfold_peft.steps" in line]
    assert len(lines) == 5 and "step 3/5 | loss" in lines[2] and "lr 0.1" in lines[2] and "ETA" in lines[2]
    assert "s/step" in lines[4] and "ETA" not in lines[4]
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no tqdm redraws


def test_wandb_runs_offline_resumes_its_own_run_and_logs_every_record(tmp_path, monkeypatch):
    """The calls the W&B logger makes, recorded by a stand-in module (the real package is not a dependency):
    offline mode under RUN/wandb, one run id kept across sessions, every metrics record at its step."""
    import importlib.machinery
    import sys
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what an installed package has
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunDir(tmp_path / "run")
    assert run_training(ToyTask(steps=4, loggers="wandb"), run.path, progress=False) == EXIT_OK
    assert run_training(ToyTask(steps=6, loggers="wandb"), run.path, resume=True, progress=False) == EXIT_OK
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and {i["id"] for i in inits} == {"abc123"}
    assert all(i["mode"] == "offline" and i["resume"] == "allow" and i["dir"] == str(run.path) for i in inits)
    logged = [(c[1], c[2]) for c in calls if c[0] == "log"]
    assert [step for step, _ in logged if "train/loss" in _] == [1, 2, 3, 4, 5, 6]
    assert {step for step, data in logged if "val/score" in data} == {0, 2, 4, 6}
    assert calls.count(("finish",)) == 2
