"""The run contract: resume from the run's own config, stop anywhere, move anywhere, refuse tampered files."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from esmfold_peft.fold import train as trainer
from esmfold_peft.fold.run.checkpoint import read_checkpoint
from esmfold_peft.runtime.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from esmfold_peft.runtime.rundir import RunDir
from fold_fixtures import load_script, tiny_run_config, write_tiny_config_file

ROOT = Path(__file__).resolve().parents[1]


script = load_script


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_resume_without_flags_uses_the_runs_own_config_and_steps_extend_it(tmp_path, capsys):
    train_fold = script("train_fold")
    config = write_tiny_config_file(tmp_path, steps=2)
    run = tmp_path / "run"
    overrides = ["--set", "model.trunk.num_blocks=2", "--set", "adapter.rank=3", "--set", "train.log_every=1"]
    assert train_fold.main(["--config", str(config), "--out", str(run), "--no-progress", *overrides]) == EXIT_OK
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["trunk"]["num_blocks"] == 2 and stored["adapter"]["rank"] == 3
    assert stored["adapter"]["alpha"] == 3.0  # α resolved and stored (α = r by default)
    # the README's command, with no flags: the run's config, not today's defaults; already complete
    assert train_fold.main(["--out", str(run), "--resume", "--no-progress"]) == EXIT_OK
    assert summary(run)["steps"] == 2
    # --steps extends the run from its checkpoint
    assert train_fold.main(["--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == EXIT_OK
    s = summary(run)
    assert s["steps"] == 4 and s["target_steps"] == 4 and s["status"] == "completed" and s["schema_version"] == 1
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    losses = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses == [1, 2, 3, 4]
    # a refused change names the key with both values
    capsys.readouterr()
    assert train_fold.main(["--out", str(run), "--resume", "--rank", "5", "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "adapter.rank: run has 3, asked 5" in err and "Traceback" not in err


def test_interrupt_during_initial_validation_leaves_a_status_and_resumes(tmp_path, monkeypatch):
    cfg = tiny_run_config(tmp_path, steps=2)
    run = tmp_path / "run"
    real = trainer.validate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "validate", interrupted)
    assert trainer.train(cfg, run, progress=False) == EXIT_INTERRUPTED
    s = summary(run)
    assert s["status"] == "interrupted" and s["steps"] == 0 and s["exit_code"] == EXIT_INTERRUPTED
    assert not (run / "checkpoints" / "last.pt").exists()
    monkeypatch.setattr(trainer, "validate", real)
    assert trainer.train(tiny_run_config(tmp_path, steps=2), run, resume=True, progress=False) == EXIT_OK
    assert summary(run)["status"] == "completed" and summary(run)["val_lddt_ca_initial"] is not None


def test_interrupt_during_periodic_validation_checkpoints_the_steps_done_and_resumes_exactly(tmp_path, monkeypatch):
    def config(steps):
        cfg = tiny_run_config(tmp_path, steps=steps)
        cfg.train.val_every = 2
        return cfg

    straight = tmp_path / "straight"
    assert trainer.train(config(4), straight, progress=False) == EXIT_OK
    calls = {"n": 0}
    real = trainer.validate

    def second_call_interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the periodic validation after step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(trainer, "validate", second_call_interrupted)
    assert trainer.train(config(4), run, progress=False) == EXIT_INTERRUPTED
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2  # written although ckpt_every = 0
    assert summary(run)["status"] == "interrupted"
    monkeypatch.setattr(trainer, "validate", real)
    assert trainer.train(config(4), run, resume=True, progress=False) == EXIT_OK
    a = read_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_start_is_marked_and_can_be_replaced(tmp_path, capsys):
    train_fold = script("train_fold")
    config = write_tiny_config_file(tmp_path, steps=1)
    run = tmp_path / "run"
    bad = ["--set", f"model.lm.path={tmp_path / 'no_such_lm'}"]
    assert train_fold.main(["--config", str(config), "--out", str(run), "--no-progress", *bad]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no_such_lm" in err and "Traceback" not in err
    s = summary(run)
    assert s["status"] == "failed" and "no_such_lm" in s["reason"]
    assert train_fold.main(["--config", str(config), "--out", str(run), "--no-progress"]) == EXIT_OK
    assert summary(run)["status"] == "completed"


def test_bad_flags_write_nothing(tmp_path, capsys):
    train_fold = script("train_fold")
    config = write_tiny_config_file(tmp_path, steps=1)
    cases = [(["--set", "train.steps=abc"], "train.steps must be an integer"),
             (["--set", "train.stpes=3"], "did you mean 'train.steps'"),
             (["--modes", "foo"], "foo"),
             (["--adapter", "lora", "--modes", "heads"], "--modes applies to LoRTA only")]
    for k, (flags, message) in enumerate(cases):
        run = tmp_path / f"run{k}"
        assert train_fold.main(["--config", str(config), "--out", str(run), "--no-progress", *flags]) == EXIT_USAGE
        err = capsys.readouterr().err  # (the config file writes a tiny model first: its progress bar is not ours)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
        assert not run.exists()


def test_torn_metrics_line_and_stale_temporaries_do_not_block_resume(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=2)
    run = tmp_path / "run"
    assert trainer.train(cfg, run, progress=False) == EXIT_OK
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a line
    (run / "checkpoints" / ".last.pt.abc123").write_bytes(b"half a checkpoint")
    cfg = tiny_run_config(tmp_path, steps=3)
    assert trainer.train(cfg, run, resume=True, progress=False) == EXIT_OK
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not list((run / "checkpoints").glob(".last.pt.*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("moved")
    cfg = tiny_run_config(base, steps=1)
    run = base / "run"
    cfg.data.cache_dir = str(run / "cache")  # inside the run: stored as {run}/cache
    assert trainer.train(cfg, run, progress=False) == EXIT_OK
    return base, run


def test_a_moved_run_directory_predicts(trained, tmp_path, capsys):
    base, run = trained
    stored = json.loads((run / "config.json").read_text())
    assert stored["data"]["cache_dir"] == "{run}/cache"
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVK\n")
    predict = script("predict")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    assert predict.main(["--fasta", str(fasta), "--run", str(moved), "--out", str(tmp_path / "p1"), "--quiet"]) == 0
    # the language model moves too: named in the error, and given with --set
    lm = Path(stored["model"]["lm"]["path"])
    moved_lm = tmp_path / "lm_elsewhere"
    shutil.copytree(lm, moved_lm)
    stored["model"]["lm"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert predict.main(["--fasta", str(fasta), "--run", str(moved), "--out", str(tmp_path / "p2"), "--quiet"]) == 2
    assert "gone" in capsys.readouterr().err
    assert predict.main(["--fasta", str(fasta), "--run", str(moved), "--out", str(tmp_path / "p3"), "--quiet",
                         "--set", f"model.lm.path={moved_lm}", "--set", "model.trunk.chunk_size=4"]) == 0
    a = (tmp_path / "p1" / "a.pdb").read_text()
    assert a == (tmp_path / "p3" / "a.pdb").read_text()
    # what would change the trained model is refused
    assert predict.main(["--fasta", str(fasta), "--run", str(moved), "--out", str(tmp_path / "p4"), "--quiet",
                         "--set", f"model.lm.path={moved_lm}", "--set", "adapter.rank=5"]) == 2
    assert "adapter.rank" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["model/fold_model.safetensors", "adapter/adapter_model.safetensors"])
def test_tampered_weights_are_refused(trained, tmp_path, capsys, target):
    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / target
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    out = tmp_path / "out"
    assert script("predict").main(["--fasta", str(fasta), "--run", str(copy), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and path.name in err and "Traceback" not in err
    assert not list(out.glob("*.pdb"))


def test_written_files_follow_the_umask(trained):
    _, run = trained
    for name in ("config.json", "summary.json", "checkpoints/last.pt", "model/fold_model.safetensors"):
        assert (run / name).stat().st_mode & 0o044, name  # readable by group and others under umask 022


def test_user_errors_cross_process_boundaries_intact():
    """DataLoader workers and torchrun processes pickle exceptions: the message, file and fault survive."""
    import pickle

    from esmfold_peft.runtime.errors import ArtifactError, ConfigError, OutputPathError

    for exc in (ArtifactError("runs/a/model.safetensors", "checksum mismatch"), ArtifactError(None, "no file"),
                ConfigError("model.lm.sdpa: expected a bool"), OutputPathError("out: a file, not a folder")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert getattr(back, "path", None) == getattr(exc, "path", None)
        assert getattr(back, "fault", None) == getattr(exc, "fault", None)


def test_a_resume_reads_the_runs_config_once_and_checks_it_twice(tmp_path, monkeypatch):
    """The command resolves the config once: one read of config.json, one check of what was read and one of
    the result with the flags; the training loop trusts it."""
    from esmfold_peft.fold.run import config as fold_config
    from esmfold_peft.fold.run import resolve

    train_fold = script("train_fold")
    config = write_tiny_config_file(tmp_path, steps=1)
    run = tmp_path / "run"
    assert train_fold.main(["--config", str(config), "--out", str(run), "--no-progress"]) == EXIT_OK
    reads, checks = [], []
    real_read, real_check = RunDir.read_config, fold_config.check_config
    monkeypatch.setattr(RunDir, "read_config", lambda self: reads.append(self.config) or real_read(self))
    counting = lambda cfg: checks.append(1) or real_check(cfg)  # noqa: E731
    monkeypatch.setattr(fold_config, "check_config", counting)
    monkeypatch.setattr(resolve, "check_config", counting)
    assert train_fold.main(["--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == EXIT_OK
    assert reads == [run / "config.json"] and len(checks) == 2
    assert summary(run)["steps"] == 2
