"""The training loop on tiny runs: adapters, exact resume, divergence, interruption, DDP with gloo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from esmfold_peft.adapters import read_adapter_config
from esmfold_peft.fold.run.checkpoint import load_trained_model, read_checkpoint
from esmfold_peft.runtime.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK
from esmfold_peft.fold.train import train, train_model
from esmfold_peft.runtime.errors import ConfigError, UserError
from fold_fixtures import load_script, tiny_run_config, write_tiny_config_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("adapter", ["lorta", "lora", "none", "full"])
def test_tiny_run_for_each_adapter(tmp_path, adapter):
    cfg = tiny_run_config(tmp_path, adapter=adapter, steps=3)
    status, model = train_model(cfg, tmp_path / "run", progress=False)
    assert status == EXIT_OK
    s = summary(tmp_path / "run")
    assert s["status"] == "completed" and s["steps"] == 3 and not s["diverged"]
    assert s["val_lddt_ca_initial"] is not None and s["val_lddt_ca_final"] is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "fold_model.safetensors").is_file()
    has_adapter = (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert has_adapter == (adapter in ("lorta", "lora"))
    if has_adapter:
        assert read_adapter_config(tmp_path / "run" / "adapter")["method"] == adapter
        assert s["trainable_parameters"]["adapter"] > 0
        assert model.esm.peft.get().B.abs().max() > 0 if adapter == "lorta" else True
    # the exported run loads back into the same function
    loaded, _ = load_trained_model(tmp_path / "run")
    batch_aa = torch.randint(0, 20, (1, 12))
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model(batch_aa, num_recycles=0)["positions"]
        b = loaded(batch_aa, num_recycles=0)["positions"]
    torch.testing.assert_close(a, b)


def test_lorta_factors_move_from_initial_values(tmp_path):
    cfg = tiny_run_config(tmp_path, adapter="lorta", steps=4)
    from esmfold_peft.fold.model.build import build_model
    from esmfold_peft.fold.train import seed_everything

    seed_everything(cfg.train.seed)
    initial = {n: p.detach().clone() for n, p in build_model(cfg).esm.peft.get().named_parameters()}
    _, model = train_model(cfg, tmp_path / "run", progress=False)
    for n, p in model.esm.peft.get().named_parameters():
        assert not torch.equal(p, initial[n]), f"LoRTA factor {n} did not change"


def test_resume_is_bitwise_exact(tmp_path):
    full = tiny_run_config(tmp_path, steps=6)
    full.train.ckpt_every = 2
    full.optim.ema_decay = 0.9
    assert train(full, tmp_path / "full", progress=False) == EXIT_OK

    half = tiny_run_config(tmp_path, steps=3)
    half.train.ckpt_every = 2
    half.optim.ema_decay = 0.9
    assert train(half, tmp_path / "half", progress=False) == EXIT_OK
    half.train.steps = 6
    assert train(half, tmp_path / "half", resume=True, progress=False) == EXIT_OK

    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r]
    assert losses(tmp_path / "full") == losses(tmp_path / "half")


def test_existing_run_needs_resume_and_same_config(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=1)
    assert train(cfg, tmp_path / "run", progress=False) == EXIT_OK
    with pytest.raises(UserError, match="already holds a run .*--resume"):
        train(cfg, tmp_path / "run", progress=False)
    cfg.adapter.rank = 3
    with pytest.raises(ConfigError, match="adapter.rank: run has 2, asked 3"):
        train(cfg, tmp_path / "run", resume=True, progress=False)


def test_divergence_stops_cleanly_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=2)
    assert train(cfg, tmp_path / "run", progress=False) == EXIT_OK
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    cfg.train.steps = 5
    cfg.train.diverge_loss_threshold = 1e-3  # any real loss is above this
    assert train(cfg, tmp_path / "run", resume=True, progress=False) == EXIT_DIVERGED
    s = summary(tmp_path / "run")
    assert s["diverged"] and s["status"] == "diverged"
    assert s["divergence"]["step"] == 2 and "above train.diverge_loss_threshold" in s["divergence"]["rule"]
    assert ckpt.read_bytes() == before  # the last good checkpoint is untouched


def test_nan_loss_is_a_divergence(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=4)
    cfg.optim.lr = 1e30  # Adam moves every parameter by ~1e30: the next loss is not finite
    cfg.optim.warmup_steps = 0
    cfg.train.diverge_loss_threshold = float("inf")
    assert train(cfg, tmp_path / "run", progress=False) == EXIT_DIVERGED
    assert "non-finite" in summary(tmp_path / "run")["divergence"]["rule"]


def test_interrupted_run_resumes(tmp_path, capsys):
    """A real SIGINT in the middle of a run (sent to this process, whose main thread trains): exit 130 after the
    step in flight and its checkpoint; --resume --steps continues from there."""
    import threading

    config_file = write_tiny_config_file(tmp_path, steps=100000)
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"

    def interrupt_after_three_steps():
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 3:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    train_fold = load_script("train_fold")
    watcher = threading.Thread(target=interrupt_after_three_steps, daemon=True)
    watcher.start()
    assert train_fold.main(["--config", str(config_file), "--out", str(run), "--no-progress"]) == EXIT_INTERRUPTED
    watcher.join()
    assert f"continue with: python scripts/train_fold.py --out {run} --resume" in capsys.readouterr().out
    s = summary(run)
    assert s["status"] == "interrupted"
    stopped = read_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert stopped == s["steps"] >= 3
    assert train_fold.main(["--out", str(run), "--resume", "--steps", str(stopped + 2), "--no-progress"]) == EXIT_OK
    assert summary(run)["steps"] == stopped + 2


def _ddp_worker(rank, world, port, tmp, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, str(TESTS))
    from fold_fixtures import tiny_run_config as make

    cfg = make(Path(tmp), steps=3)
    cfg.train.effective_batch_size = 4  # 2 per process
    status, model = train_model(cfg, Path(out), progress=False)
    torch.save({"status": status, "params": {n: p.detach() for n, p in model.named_parameters()
                                              if p.requires_grad}}, Path(tmp) / f"rank{rank}.pt")


def test_ddp_two_processes_hold_identical_parameters(tmp_path):
    tiny_run_config(tmp_path)  # write the shared files once, before the processes start
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), str(tmp_path / "run")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["status"] == r1["status"] == EXIT_OK
    assert r0["params"].keys() == r1["params"].keys()
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    s = summary(tmp_path / "run")
    assert s["processes"] == 2 and s["steps"] == 3


def test_openfold_layout_source_trains(tmp_path, to_mmcif):
    """mmCIF directory + chain_data_cache.json, with its filters and cluster-size weights."""
    from fold_fixtures import synthetic_chain_pdb

    mmcif_dir = tmp_path / "mmcif"
    mmcif_dir.mkdir()
    cache = {}
    for i, pdb_id in enumerate(["1abc", "2def", "3ghi"]):
        text = synthetic_chain_pdb(copies=2 + i, seed=i)
        (mmcif_dir / f"{pdb_id}.cif").write_text(to_mmcif(text.splitlines()))
        cache[f"{pdb_id}_A"] = {"release_date": "2020-01-01", "seq": "NIAEVCMD" * (2 + i),
                                "resolution": 2.0 if i < 2 else 12.0, "cluster_size": 1 + i}
    (tmp_path / "chain_data_cache.json").write_text(json.dumps(cache))
    cfg = tiny_run_config(tmp_path, steps=2)
    cfg.data.source = "openfold"
    cfg.data.mmcif_dir = str(mmcif_dir)
    cfg.data.chain_data_cache = str(tmp_path / "chain_data_cache.json")
    cfg.data.val_mmcif_dir = str(mmcif_dir)
    cfg.data.cache_dir = str(tmp_path / "of_cache")
    assert train(cfg, tmp_path / "run", progress=False) == EXIT_OK
    manifest = json.loads((tmp_path / "of_cache" / "train" / "manifest.json").read_text())
    assert sorted(c["name"] for c in manifest["chains"]) == ["1abc_A", "2def_A"]  # 12 Å is filtered out
    assert summary(tmp_path / "run")["val_final"]["n_chains"] == 2


def test_each_run_logs_to_its_own_file(tmp_path):
    import logging

    for name in ("a", "b"):
        assert train(tiny_run_config(tmp_path, steps=1), tmp_path / name, progress=False) == EXIT_OK
    assert "wrote" in (tmp_path / "a" / "train.log").read_text()
    assert str(tmp_path / "b") not in (tmp_path / "a" / "train.log").read_text()
    assert not [h for h in logging.getLogger("esmfold_peft").handlers if isinstance(h, logging.FileHandler)]


def test_torchrun_launches_two_processes(tmp_path, monkeypatch, capsys):
    config_file = write_tiny_config_file(tmp_path, steps=2)
    args = ["--config", str(config_file), "--no-progress", "--set", "train.effective_batch_size=4"]
    with monkeypatch.context() as m:  # what each process of a torchrun job sees: every process must name the run
        m.setenv("WORLD_SIZE", "2")
        assert load_script("train_fold").main(args) == 2
        assert "give --out" in capsys.readouterr().err
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(launcher + [str(ROOT / "scripts" / "train_fold.py")] + args + ["--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s = summary(tmp_path / "run")
    assert s["processes"] == 2 and s["status"] == "completed" and s["steps"] == 2


def test_extending_a_run_whose_validation_worsens_keeps_the_best_model(tmp_path, monkeypatch):
    """The issue's case: `--resume --steps` past the best must not leave the worse model in model/ and adapter/."""
    from safetensors.torch import load_file

    from esmfold_peft.fold import train as trainer

    scripted = iter([0.05, 0.3, 0.2, 0.25])  # initial, step 2, step 4 (worse), step 4 again (keep=last)
    real = trainer.validate

    def scripted_validate(*args, **kwargs):
        res = real(*args, **kwargs)
        res["lddt_ca"] = next(scripted)
        return res

    monkeypatch.setattr(trainer, "validate", scripted_validate)
    run = tmp_path / "run"
    assert train(tiny_run_config(tmp_path, steps=2), run, progress=False) == EXIT_OK
    longer = tiny_run_config(tmp_path, steps=4)
    assert train(longer, run, resume=True, progress=False) == EXIT_OK
    s = summary(run)
    assert (s["best_step"], s["best_value"], s["last_step"], s["last_value"]) == (2, 0.3, 4, 0.2)
    assert s["kept"] == "best" and s["kept_step"] == 2 and s["val_lddt_ca_final"] == 0.2
    best, last = (read_checkpoint(run / "checkpoints" / f"{n}.pt") for n in ("best", "last"))
    assert best["step"] == 2 and last["step"] == 4
    exported = load_file(run / "model" / "fold_model.safetensors")
    assert all(torch.equal(v, best["model"][k]) for k, v in exported.items())
    assert not all(torch.equal(v, last["model"][k]) for k, v in exported.items())
    factors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(v, best["model"][f"esm.peft.adapters.default.{k.split('.', 1)[1]}"]) for k, v in factors.items())
    assert "kept the best model, step 2's" in (run / "train.log").read_text()
    # train.keep=last (free to change on resume) exports the last model and says that it is not the best
    longer.train.keep = "last"
    longer.train.steps = 5
    assert train(longer, run, resume=True, progress=False) == EXIT_OK
    s = summary(run)
    assert s["kept"] == "last" and s["kept_step"] == 5 and s["best_step"] == 2
    exported = load_file(run / "model" / "fold_model.safetensors")
    last = read_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.equal(v, last["model"][k]) for k, v in exported.items())
    assert "train.keep=last: the exported model is step 5's" in (run / "train.log").read_text()


class Killed(BaseException):
    """kill -9 as the run loop sees it: nothing after it runs (no handler catches it)."""


def _six_steps_validated_every_two(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=6)
    cfg.train.val_every, cfg.train.ckpt_every = 2, 3
    return cfg


@pytest.fixture(scope="module")
def straight_six_steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    assert train(_six_steps_validated_every_two(tmp), tmp / "run", progress=False) == EXIT_OK
    return tmp


@pytest.mark.parametrize("moment", ["after the step-4 validation", "between best.pt's checkpoint and its copy"])
def test_a_killed_run_resumes_to_the_straight_run_best_model_included(straight_six_steps, monkeypatch, moment):
    from esmfold_peft.fold import train as trainer
    from esmfold_peft.runtime import loop

    calls = {"validate": 0, "copy": 0}
    real_validate, real_copy = trainer.validate, loop.copy_checksummed

    def validate(*args, **kwargs):
        calls["validate"] += 1
        if moment.startswith("after") and calls["validate"] == 4:  # initial, 2, 4: killed after the third
            raise Killed
        return real_validate(*args, **kwargs)

    def copy(*args, **kwargs):
        calls["copy"] += 1
        if moment.startswith("between") and calls["copy"] == 2:
            raise Killed
        return real_copy(*args, **kwargs)

    tmp = straight_six_steps  # the same data and language model: the same run, killed and resumed
    run = tmp / ("killed-" + moment.split()[0])
    with monkeypatch.context() as m:
        m.setattr(trainer, "validate", validate)
        m.setattr(loop, "copy_checksummed", copy)
        with pytest.raises(Killed):
            train(_six_steps_validated_every_two(tmp), run, progress=False)
    assert train(_six_steps_validated_every_two(tmp), run, resume=True, progress=False) == EXIT_OK
    for name in ("last.pt", "best.pt"):
        a, b = (read_checkpoint(r / "checkpoints" / name) for r in (tmp / "run", run))
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    s, t = summary(tmp / "run"), summary(run)
    assert [s[k] for k in ("best_step", "best_value", "kept", "kept_step")] == \
        [t[k] for k in ("best_step", "best_value", "kept", "kept_step")]
