"""The NLP training loop on tiny random encoders: the run contract, exact resume, interrupts, divergence."""

import json
from pathlib import Path

import pytest
import torch

import background

from esmfold_peft.adapters import LoRTA, LoRTAConfig, load_adapter
from esmfold_peft.nlp.config import base_config, config_for_resume, resolve_defaults
from esmfold_peft.nlp.models import build_classifier
from esmfold_peft.nlp.tasks import load_head
from esmfold_peft.nlp.tasks import batch_indices
from esmfold_peft.nlp.train import train
from fold_fixtures import load_script
from esmfold_peft.runtime.artifacts import load_safetensors, torch_load
from esmfold_peft.runtime.errors import ConfigError, UserError
from esmfold_peft.runtime.rundir import RunDir
from esmfold_peft.runtime.session import StopSignal

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = ["a wonderful moving film", "great acting, smart script", "funny and warm", "a delight", "brilliant"]
NEGATIVE = ["a dull tedious mess", "terrible acting, boring plot", "painfully bad", "a waste of time", "ugly"]


@pytest.fixture(scope="module")
def scored_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "scores.txt"
    lines = []
    for i in range(60):
        good = i % 2 == 0
        text = (POSITIVE if good else NEGATIVE)[i % 5] + f" number {i}"
        lines.append(f"{i}_1\t{(1.5 + i % 3) * (1 if good else -1):.1f}\t{text}")
    path.write_text("\r\n".join(lines) + "\r\n")
    return path


def tiny_cfg(data: Path, method="lorta", family="bert", steps=6, task="rt-polarity"):
    cfg = base_config()
    cfg.name = "test"
    cfg.task = task
    cfg.model.name = "random"
    cfg.model.max_length = 32
    cfg.model.random.family = family
    cfg.data.path = str(data)
    cfg.adapter.method = method
    cfg.adapter.rank = 2
    cfg.train.steps = steps
    cfg.train.batch_size = 4
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.train.num_threads = 1
    cfg.eval.batch_size = 32
    return resolve_defaults(cfg)


class StopAfter(StopSignal):
    """Asks to stop once `n` steps have run (as a SIGINT inside step n would).

    The run loop defers signals twice per step (the step, then its checkpoint): the request is made in
    step n's first deferred block.
    """

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, 0

    @property
    def requested(self):
        return self.seen >= 2 * self.n - 1

    @requested.setter
    def requested(self, value):
        pass

    def deferred(self):
        self.seen += 1
        return super().deferred()


def trained(run: Path) -> dict:
    return torch_load(run / "checkpoints" / "last.pt")["trainable"]


def test_classification_run_writes_the_contract_and_loads_back(tmp_path, scored_file):
    cfg = tiny_cfg(scored_file)
    assert train(cfg, tmp_path / "run", progress=False) == 0
    run = RunDir(tmp_path / "run")
    summary = run.read_summary()
    assert summary["status"] == "completed" and summary["application"] == "nlp" and summary["steps"] == 6
    assert summary["primary_metric"] == "accuracy" and summary["primary_final"] is not None
    # LoRTA's count is the formula r(d + d_H + H + L + 4) on the tiny BERT (d=32, H=4, L=2)
    assert summary["adapter_parameters"] == 2 * (32 + 8 + 4 + 2 + 4)
    assert summary["parameters"]["trainable"] == summary["adapter_parameters"] + summary["parameters"]["head"]
    assert json.loads(run.config.read_text())["adapter"]["alpha"] == 4.0  # resolved default, 2 × rank
    records = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval" in r] == [0, 6]
    assert (run.path / "training_curves.png").stat().st_size > 1000
    # the exported adapter and head reproduce the trained network's predictions
    torch.manual_seed(123)
    net = build_classifier(cfg, 2)
    load_adapter(net.model, run.adapter_dir, allow_other_base=True)  # a base of other random weights, on purpose
    load_head(net.model, run.adapter_dir)
    state = trained(run.path)
    params = dict(net.model.named_parameters())
    for name, value in state.items():
        assert torch.equal(params[name].detach(), value), name


def test_interrupted_run_resumes_exactly(tmp_path, scored_file):
    cfg = tiny_cfg(scored_file)
    assert train(cfg, tmp_path / "straight", progress=False) == 0
    assert train(tiny_cfg(scored_file), tmp_path / "split", progress=False, stop=StopAfter(3)) == 130
    run = RunDir(tmp_path / "split")
    assert run.read_summary()["status"] == "interrupted" and run.read_summary()["steps"] == 3
    assert train(config_for_resume(run.read_config(), []), run.path, resume=True, progress=False) == 0
    a, b = trained(tmp_path / "straight"), trained(run.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicate records from the interrupted session


def test_resume_extends_steps_and_refuses_other_changes(tmp_path, scored_file):
    cfg = tiny_cfg(scored_file, steps=4)
    cfg.optim.schedule = "constant"
    cfg.optim.warmup_ratio = 0.0
    assert train(cfg, tmp_path / "run", progress=False) == 0
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        config_for_resume(run.read_config(), ["adapter.rank=8", "optim.lr=0.5"])
    assert "adapter.rank: run has 2, asked 8" in str(err.value) and "optim.lr" in str(err.value)
    resumed = config_for_resume(run.read_config(), ["train.steps=6"])
    assert train(resumed, run.path, resume=True, progress=False) == 0
    long = tiny_cfg(scored_file, steps=6)
    long.optim.schedule, long.optim.warmup_ratio = "constant", 0.0
    assert train(long, tmp_path / "long", progress=False) == 0
    a, b = trained(run.path), trained(tmp_path / "long")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run.read_summary()["steps"] == 6


def test_new_run_refuses_a_directory_holding_one(tmp_path, scored_file):
    assert train(tiny_cfg(scored_file, steps=2), tmp_path / "run", progress=False) == 0
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_cfg(scored_file, steps=2), tmp_path / "run", progress=False)


def test_divergence_exits_3_and_keeps_the_checkpoint(tmp_path, scored_file):
    cfg = tiny_cfg(scored_file, steps=4)
    assert train(cfg, tmp_path / "run", progress=False) == 0
    before = trained(tmp_path / "run")
    resumed = config_for_resume(RunDir(tmp_path / "run").read_config(), ["train.steps=8"])
    resumed.train.diverge_loss_threshold = 1e-6  # every loss is now "too large"
    assert train(resumed, tmp_path / "run", resume=True, progress=False) == 3
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["status"] == "diverged" and "diverge_loss_threshold" in summary["reason"]
    after = trained(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method,family", [("none", "bert"), ("full", "roberta"), ("lora", "roberta"), ("lora", "mpnet")])
def test_head_only_full_and_lora_on_roberta(tmp_path, scored_file, method, family):
    cfg = tiny_cfg(scored_file, method=method, family=family, steps=2)
    assert train(cfg, tmp_path / "run", progress=False) == 0
    summary = RunDir(tmp_path / "run").read_summary()
    p = summary["parameters"]
    if method == "none":
        assert p["adapter"] == 0 and p["trainable"] == p["head"]
        assert (tmp_path / "run" / "adapter" / "head.safetensors").is_file()
    elif method == "full":
        assert p["trainable"] == p["total"] and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    else:
        assert p["adapter"] == 2 * 2 * (2 * 32) * 4  # LoRA: L·Σ r(in+out) over q,k,v,o
    assert summary["layout"]["family"] == ("hf-mpnet" if family == "mpnet" else "hf-bert")


def test_regression_task(tmp_path, scored_file):
    cfg = tiny_cfg(scored_file, task="rt-score", steps=2)
    assert train(cfg, tmp_path / "run", progress=False) == 0
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["primary_metric"] == "pearson" and set(summary["eval_final"]) == {"pearson", "spearman"}
    head = load_safetensors(tmp_path / "run" / "adapter" / "head.safetensors")
    assert head["classifier.weight"].shape[0] == 1


def test_lorta_count_matches_paper_for_roberta_shapes():
    from esmfold_peft.adapters import architecture

    assert LoRTA.formula_num_parameters(LoRTAConfig(rank=4), architecture("roberta-base")) == 3440


def test_batches_depend_only_on_seed_and_step():
    a = [batch_indices(10, 4, 0, s) for s in range(5)]
    b = [batch_indices(10, 4, 0, s) for s in reversed(range(5))][::-1]
    assert a == b
    flat = sum(a[:2], []) + a[2][:2]  # the first epoch covers each example once
    assert sorted(flat) == list(range(10))


@background.job("train_nlp_program")
def train_nlp_program(folder):
    return background.run(ROOT / "scripts" / "train_nlp.py", "--task", "rt-polarity", "--set", "optim.lrr=1",
                          "--out", folder / "x")


def test_script_reports_a_bad_key_in_one_line():
    out = background.result("train_nlp_program")  # the script as a program
    assert out.returncode == 2
    assert "did you mean 'optim.lr'" in out.stderr and "Traceback" not in out.stderr


def test_script_resume_without_a_run_is_a_user_error(tmp_path, capsys):
    assert load_script("train_nlp").main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_sweep_writes_table_and_plot_and_reuses_runs(tmp_path, scored_file):
    from esmfold_peft.nlp.sweep import run_sweep

    grid = (("lorta", 2), ("lora", 2), ("none", 0))
    made = []

    def make():
        made.append(1)
        cfg = tiny_cfg(scored_file, steps=2)
        cfg.optim.lr = 0.0  # let each method take its own default
        return cfg

    assert run_sweep(make, tmp_path / "sweep", grid, progress=False) == 0
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| lorta-r2 |" in table and "| lora-r2 |" in table and "| head-only |" in table
    assert (tmp_path / "sweep" / "metric_vs_parameters.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["x_parameters"] for r in rows] == [100, 2 * 2 * 64 * 4, 0]
    assert run_sweep(make, tmp_path / "sweep", grid, progress=False) == 0 and len(made) == 3  # reused


def test_script_trains_then_extends_with_resume(tmp_path, scored_file, capsys):
    main = load_script("train_nlp").main
    common = ["--set", "model.name=random", "--set", f"data.path={scored_file}", "--set", "model.max_length=32",
              "--set", "train.batch_size=4", "--no-progress"]
    out = tmp_path / "run"
    assert main(["--task", "rt-polarity", "--adapter", "lora", "--rank", "2", "--steps", "2", "--out", str(out)]
                + common) == 0
    printed = capsys.readouterr().out
    assert f"done: results in {out}/summary.json" in printed and "--resume --steps N" in printed
    assert main(["--out", str(out), "--resume", "--rank", "4"]) == 2
    assert "adapter.rank: run has 2, asked 4" in capsys.readouterr().err
    assert main(["--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert RunDir(out).read_summary()["steps"] == 3
