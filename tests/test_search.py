"""The staged α search and the sweep: schedule, choice rule, resumability, stored-config checks, reports.

Most tests replace the trainer with a fake that writes config.json and summary.json with chosen
outcomes (diverged or an LDDT-Cα per α), so the whole staged logic runs without training. One
end-to-end test runs scripts/alpha_search.py on a tiny model.
"""

import json
import logging
from pathlib import Path

import pytest

import background

from esmfold_peft.fold.experiments import search
from esmfold_peft.fold import train as trainer
from esmfold_peft.fold.run.resolve import fill_defaults
from esmfold_peft.fold.run.checkpoint import write_json_atomic
from esmfold_peft.fold.experiments.search import (ALL_DIVERGED, CHOSEN, INTERRUPTED, SearchError, alpha_dir_name, alpha_search,
                                      choose, parse_multipliers, stage_alphas, stages)
from esmfold_peft.fold.experiments.sweep import parse_runs, run_sweep
from fold_fixtures import load_script, tiny_run_config, write_tiny_config_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PARAMS = {"lorta": 100, "lora": 1000, "none": 0, "full": 0}


# --- schedule and choice (pure) -------------------------------------------------------------------

def test_stage_alphas_follow_the_paper():
    assert stage_alphas(8) == [2048, 1024]
    assert stage_alphas(8, stage=1) == [512, 256]
    assert stage_alphas(1, stage=3) == [4, 2]  # the paper's LoRTA r=1 ended at α = 2
    assert stage_alphas(1, (128, 256), 0) == [256, 128]  # largest first whatever the order given
    assert stage_alphas(2, (256,), 2) == [128]  # one multiplier: plain halving
    assert stage_alphas(1, (256, 128, 64), 1) == [32, 16, 8]  # stages never overlap


def test_stages_go_down_to_the_floor():
    assert stages(1, floor=1) == [[256, 128], [64, 32], [16, 8], [4, 2], [1]]
    assert stages(8, floor=64) == [[2048, 1024], [512, 256], [128, 64]]
    assert stages(8, floor=100)[-1] == [128]  # a partial last stage
    with pytest.raises(SearchError, match="above the first stage"):
        stages(1, floor=1000)
    for bad in ((), (256, 256), (256, -1)):
        with pytest.raises(SearchError, match="distinct positive"):
            stage_alphas(1, bad)
    with pytest.raises(SearchError, match="positive"):
        stages(1, floor=0)
    assert parse_multipliers("256, 128") == (256, 128)
    with pytest.raises(SearchError, match="comma-separated"):
        parse_multipliers("256;128")


def cand(alpha, lddt=None, diverged=False, status=None):
    return {"alpha": alpha, "diverged": diverged, "val_lddt_ca_final": lddt,
            "status": status or ("diverged" if diverged else "completed")}


def test_choose_best_converged_and_ties_to_larger_alpha():
    assert choose([cand(256, diverged=True), cand(128, diverged=True)]) is None
    assert choose([cand(256, diverged=True), cand(128, 0.5)])["alpha"] == 128
    assert choose([cand(256, 0.4), cand(128, 0.5)])["alpha"] == 128
    assert choose([cand(128, 0.5), cand(256, 0.5)])["alpha"] == 256  # tie: larger α
    assert choose([cand(256, 0.9, status="interrupted"), cand(128, 0.5)])["alpha"] == 128
    with pytest.raises(SearchError, match="validation set"):
        choose([cand(256, None)])


def test_parse_runs():
    assert parse_runs("lora:1, lorta:8,none,full") == [("lora", 1), ("lorta", 8), ("none", None), ("full", None)]
    for bad, msg in (("lorta", "needs a rank"), ("lorta:0", "needs a rank"), ("none:2", "takes no rank"),
                     ("vera:4", "must be one of"), ("lora:1,lora:1", "twice"), (",", "no sweep entries")):
        with pytest.raises(SearchError, match=msg):
            parse_runs(bad)


# --- a fake trainer -------------------------------------------------------------------------------

class FakeTrainer:
    """Stands in for `train`: writes config.json and summary.json as the real trainer does.

    `outcome(alpha)` gives the final LDDT-Cα, "diverged", or "interrupted" (which leaves a checkpoint).
    """

    def __init__(self, outcome):
        self.outcome = outcome
        self.calls = []  # (alpha, resume)

    def __call__(self, cfg, out_dir, resume=False, progress=True):
        out_dir = Path(out_dir)
        fill_defaults(cfg)
        method = cfg.adapter.method
        alpha = float(cfg.adapter.alpha) if method in ("lorta", "lora") else None
        self.calls.append((alpha if alpha is not None else method, resume))
        result = self.outcome(alpha if alpha is not None else method)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", cfg.to_dict())
        status = {"diverged": "diverged", "interrupted": "interrupted"}.get(result, "completed")
        if status == "interrupted":
            (out_dir / "checkpoints").mkdir(exist_ok=True)
            (out_dir / "checkpoints" / "last.pt").write_bytes(b"")
        write_json_atomic(out_dir / "summary.json", {
            "adapter": method, "rank": cfg.adapter.rank, "alpha": alpha, "config": cfg.name,
            "trainable_parameters": {"adapter": PARAMS[method], "language_model": 5000 if method == "full" else 0,
                                     "trunk_and_heads": 10, "total": PARAMS[method] + 10 + (5000 * (method == "full"))},
            "steps": 7 if status == "diverged" else cfg.train.steps, "target_steps": cfg.train.steps,
            "wall_time_s": 1.5, "status": status, "diverged": status == "diverged",
            "divergence": {"step": 7, "rule": "non-finite loss (nan)", "terms": {}} if status == "diverged" else None,
            "divergence_rule": "non-finite loss or gradient norm, or loss > 10000.0",
            "val_lddt_ca_initial": 0.1, "val_lddt_ca_final": result if status == "completed" else None,
        })
        return {"completed": 0, "diverged": 3, "interrupted": 130}[status]


@pytest.fixture
def fake(monkeypatch):
    def install(outcome):
        f = FakeTrainer(outcome)
        monkeypatch.setattr(trainer, "train", f)
        return f
    return install


@pytest.fixture
def base(tmp_path):
    return tiny_run_config(tmp_path, steps=5)


def diverge_above(limit, lddt=lambda a: 0.5):
    return lambda a: "diverged" if a > limit else lddt(a)


# --- the staged search ----------------------------------------------------------------------------

def test_first_stage_keeps_the_better(fake, base, tmp_path):
    f = fake(lambda a: {2048.0: 0.30, 1024.0: 0.35}[a])
    state = alpha_search(base, "lorta", 8, tmp_path / "s", progress=False)
    assert [a for a, _ in f.calls] == [2048, 1024]
    assert state["status"] == CHOSEN and state["chosen"]["alpha"] == 1024 and state["chosen"]["multiplier"] == 128


def test_both_diverge_then_halve_until_one_converges(fake, base, tmp_path):
    f = fake(diverge_above(20, lddt=lambda a: {16.0: 0.4, 8.0: 0.45}[a]))
    state = alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    assert [a for a, _ in f.calls] == [256, 128, 64, 32, 16, 8]
    assert [c["stage"] for c in state["candidates"]] == [0, 0, 1, 1, 2, 2]
    assert state["status"] == CHOSEN and state["chosen"]["alpha"] == 8 and state["chosen"]["stage"] == 2
    assert state["candidates"][0]["divergence_rule"] == "non-finite loss (nan)"
    assert state["candidates"][0]["divergence_step"] == 7
    on_disk = json.loads((tmp_path / "s" / "search.json").read_text())
    assert on_disk == json.loads(json.dumps(state))


def test_all_diverged_down_to_the_floor(fake, base, tmp_path):
    f = fake(lambda a: "diverged")
    state = alpha_search(base, "lorta", 1, tmp_path / "s", floor=8, progress=False)
    assert [a for a, _ in f.calls] == [256, 128, 64, 32, 16, 8]
    assert state["status"] == ALL_DIVERGED and state["chosen"] is None
    md = (tmp_path / "s" / "search.md").read_text()
    assert "all diverged down to the floor α ≥ 8" in md
    assert "| LoRTA (r = 1) | all diverged (α ≥ 8) | — |" in md
    # lowering the floor continues the same search: nothing already tried is retrained
    f2 = fake(lambda a: "diverged" if a > 4 else 0.2)
    state = alpha_search(base, "lorta", 1, tmp_path / "s", floor=1, progress=False)
    assert [a for a, _ in f2.calls] == [4, 2]
    assert state["chosen"]["alpha"] == 4


def test_completed_candidates_are_not_retrained_and_interrupted_ones_resume(fake, base, tmp_path):
    f = fake(diverge_above(300, lddt=lambda a: "interrupted" if a == 256 else 0.3))
    state = alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    assert state["status"] == INTERRUPTED and f.calls == [(256, False)]
    f = fake(lambda a: 0.6 if a == 256 else 0.3)  # same runs, now the interrupted one finishes
    state = alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    assert f.calls == [(256, True), (128, False)]
    assert state["status"] == CHOSEN and state["chosen"]["alpha"] == 256
    f = fake(lambda a: pytest.fail("nothing should be retrained"))
    again = alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    assert f.calls == [] and again["candidates"] == state["candidates"]


def test_started_run_without_checkpoint_is_resumed_from_step_0(fake, base, tmp_path):
    run = tmp_path / "s" / "alpha-256"
    f = fake(lambda a: 0.5)
    alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    (run / "summary.json").unlink()  # as if killed before its first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    f = fake(lambda a: 0.5)
    alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    assert f.calls == [(256, True)]  # the trainer resumes a run without a checkpoint from step 0


def test_stored_run_of_another_config_is_an_error(fake, base, tmp_path):
    fake(lambda a: 0.5)
    alpha_search(base, "lora", 1, tmp_path / "s", progress=False)
    other = tiny_run_config(tmp_path, steps=9)
    with pytest.raises(SearchError, match=r"another configuration(.|\n)*train\.steps: run has 5, asked 9"):
        alpha_search(other, "lora", 1, tmp_path / "s", progress=False)
    with pytest.raises(SearchError, match="adapter.method: run has 'lora', asked 'lorta'"):
        alpha_search(base, "lorta", 1, tmp_path / "s", progress=False)
    cosmetic = tiny_run_config(tmp_path, steps=5)
    cosmetic.train.log_every = 50  # cannot change the outcome: allowed
    fake(lambda a: pytest.fail("nothing should be retrained"))
    alpha_search(cosmetic, "lora", 1, tmp_path / "s", progress=False)


def test_search_refuses_adapters_without_alpha_and_configs_without_validation(base, tmp_path):
    for adapter in ("none", "full"):
        with pytest.raises(SearchError, match="has no α"):
            alpha_search(base, adapter, 1, tmp_path / "s")
    with pytest.raises(SearchError, match="set by the search"):
        search.search_base_config("demo", ["adapter.alpha=16"])
    base.data.val_dir = ""
    with pytest.raises(SearchError, match="no validation set"):
        alpha_search(base, "lora", 1, tmp_path / "s")
    with pytest.raises(SearchError, match="no validation set"):
        run_sweep(base, [("none", None)], tmp_path / "w", alpha=1)
    assert not (tmp_path / "s").exists() and not (tmp_path / "w").exists()


def test_search_markdown_has_table6_and_every_candidate(fake, base, tmp_path):
    fake(diverge_above(200, lddt=lambda a: {128.0: 0.41, 64.0: 0.43}[a]))
    state = alpha_search(base, "lorta", 2, tmp_path / "s", progress=False)
    md = (tmp_path / "s" / "search.md").read_text()
    assert "| Model | α | Validation LDDT-Cα |" in md
    assert "| LoRTA (r = 2) | 64 | 0.4300 |" in md
    assert "chosen α = 64 (32·r, stage 1)" in md
    assert "non-finite loss or gradient norm, or loss > 10000.0" in md  # the trainer's rule, not ours
    rows = [line for line in md.splitlines() if line.startswith("| ") and "·r |" in line]
    assert len(rows) == 4
    assert "| 512 | 256·r | diverged at step 7: non-finite loss (nan) | 0.1000 | — |" in rows[0]
    assert "| 64 (chosen) | 32·r | completed | 0.1000 | 0.4300 | 100 | 110 | 5/5 | 1.5 | alpha-64 |" in rows[3]
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["status"] == "chosen" and [c["alpha"] for c in saved["candidates"]] == [512, 256, 128, 64]
    assert all(c["trainable_parameters"]["adapter"] == 100 for c in saved["candidates"])
    assert state["wall_time_s"] == 6.0


# --- the sweep ------------------------------------------------------------------------------------

def test_sweep_with_searches_and_both_ends(fake, base, tmp_path):
    f = fake(lambda a: {"none": 0.2, "full": 0.6}.get(a) if isinstance(a, str) else ("diverged" if a > 64 else a / 100))
    state = run_sweep(base, parse_runs("none,lora:1,lorta:4,full"), tmp_path / "w", search=True, progress=False)
    entries = {e["name"]: e for e in state["entries"]}
    assert entries["lora-r1"]["alpha"] == 64 and entries["lora-r1"]["alphas_tried"] == [256, 128, 64, 32]
    assert entries["lorta-r4"]["alpha"] == 64 and entries["lorta-r4"]["alphas_tried"] == [1024, 512, 256, 128, 64, 32]
    assert entries["none"]["alpha"] is None and entries["full"]["val_lddt_ca_final"] == 0.6
    assert (tmp_path / "w" / "lora-r1" / "search.json").is_file()
    assert (tmp_path / "w" / "sweep.png").stat().st_size > 0
    md = (tmp_path / "w" / "sweep.md").read_text()
    for row in ("| frozen LM (no adapter) | — | 0.2000 |", "| LoRA (r = 1) | 64 | 0.6400 |",
                "| LoRTA (r = 4) | 64 | 0.6400 |", "| full fine-tuning | — | 0.6000 |"):
        assert row in md
    assert json.loads((tmp_path / "w" / "sweep.json").read_text())["status"] == "completed"
    n = len(f.calls)
    f = fake(lambda a: pytest.fail("nothing should be retrained"))
    run_sweep(base, parse_runs("none,lora:1,lorta:4,full"), tmp_path / "w", search=True, progress=False)
    assert n == 12 and f.calls == []


def test_sweep_with_a_given_alpha_shares_runs_with_a_search(fake, base, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "sweep.png").write_bytes(b"stale")
    f = fake(lambda a: "diverged" if a == 16 else 0.5)
    state = run_sweep(base, parse_runs("lora:1,lorta:2"), tmp_path / "w", alpha=16, progress=False)
    assert [e["run_dir"] for e in state["entries"]] == ["lora-r1/alpha-16", "lorta-r2/alpha-16"]
    assert state["entries"][0]["status"] == "diverged"
    assert "diverged: non-finite loss (nan)" in (tmp_path / "w" / "sweep.md").read_text()
    assert not (tmp_path / "w" / "sweep.png").exists()  # nothing converged: no plot (and no stale one)
    f = fake(lambda a: "diverged" if a > 16 else 0.5)
    state = run_sweep(base, parse_runs("lora:1"), tmp_path / "w", search=True, floor=16, progress=False)
    assert [a for a, _ in f.calls] == [256, 128, 64, 32]  # α = 16 was already trained
    assert state["entries"][0]["status"] == ALL_DIVERGED
    with pytest.raises(SearchError, match="exactly one"):
        run_sweep(base, parse_runs("lora:1"), tmp_path / "w", alpha=16, search=True)


# --- the scripts ----------------------------------------------------------------------------------

def test_alpha_search_script_arguments(capsys):
    main = load_script("alpha_search").main
    assert main(["--adapter", "lorta", "--rank", "1", "--floor", "2", "--schedule"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "stage 0: α = 256 (256·r), 128 (128·r)" and lines[-1] == "stage 3: α = 4 (4·r), 2 (2·r)"
    assert main(["--adapter", "full", "--rank", "1"]) == 2
    assert "has no α" in capsys.readouterr().err
    assert main(["--adapter", "lora", "--rank", "1", "--multipliers", "256,x"]) == 2
    assert main(["--adapter", "lora", "--rank", "1", "--set", "adapter.rank=4"]) == 2
    assert "set by the search" in capsys.readouterr().err


def test_sweep_script_prints_the_tables(fake, tmp_path, capsys):
    config = write_tiny_config_file(tmp_path, steps=3)
    fake(lambda a: 0.3 if a == "none" else 0.5)
    main = load_script("sweep").main
    argv = ["--config", str(config), "--runs", "none,lorta:2", "--alpha", "4", "--out", str(tmp_path / "w"),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| frozen LM (no adapter) | — | 0.3000 |" in out and "| LoRTA (r = 2) | 4 | 0.5000 |" in out
    with pytest.raises(SystemExit, match="2"):  # neither --alpha nor --alpha-search
        main(argv[:4] + ["--out", str(tmp_path / "w2")])
    assert "one of the arguments --alpha-search --alpha is required" in capsys.readouterr().err
    assert main(["--config", str(config), "--runs", "lorta", "--alpha", "4"]) == 2
    assert "needs a rank" in capsys.readouterr().err


SEARCH_ARGS = ["--adapter", "lorta", "--rank", "2", "--multipliers", "4,2", "--floor", "2", "--no-progress"]


@background.job("alpha_search_program")
def alpha_search_program(folder: Path):
    """The script as a program: a search where every α diverges (a loss threshold below any loss)."""
    config = write_tiny_config_file(folder, steps=2)
    proc = background.run(ROOT / "scripts" / "alpha_search.py", "--config", config, *SEARCH_ARGS, "--out",
                          folder / "search", "--set", "train.diverge_loss_threshold=0.001")
    return proc, config, folder / "search"


@pytest.mark.slow
def test_alpha_search_script_end_to_end(tmp_path, capsys, caplog):
    """Real training on the tiny model: a first search where every α diverges (a loss threshold below any
    loss), a stored-config mismatch, a search that chooses, and a rerun that retrains nothing."""
    proc, config, out = background.result("alpha_search_program")
    argv = ["--config", str(config), *SEARCH_ARGS, "--out"]
    assert proc.returncode == 3, proc.stderr
    assert "all diverged down to the floor α ≥ 2" in proc.stdout
    state = json.loads((out / "search.json").read_text())
    assert [c["alpha"] for c in state["candidates"]] == [8, 4, 2]
    assert all(c["diverged"] and "above train.diverge_loss_threshold" in c["divergence_rule"]
               for c in state["candidates"])

    main = load_script("alpha_search").main
    assert main(argv + [str(out)]) == 2  # the default threshold: a stored-config mismatch
    assert "train.diverge_loss_threshold: run has 0.001, asked 10000.0" in capsys.readouterr().err

    out2 = tmp_path / "search2"
    assert main(argv + [str(out2)]) == 0
    assert "| LoRTA (r = 2) |" in capsys.readouterr().out
    state = json.loads((out2 / "search.json").read_text())
    assert state["status"] == "chosen" and [c["alpha"] for c in state["candidates"]] == [8, 4]
    assert state["chosen"]["alpha"] in (8, 4) and state["candidates"][0]["val_lddt_ca_final"] is not None
    assert (out2 / "alpha-8" / "adapter" / "adapter_config.json").is_file()
    mtime = (out2 / "alpha-8" / "summary.json").stat().st_mtime
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="esmfold_peft.search"):
        assert main(argv + [str(out2)]) == 0
    assert "already completed: not retrained" in caplog.text
    assert (out2 / "alpha-8" / "summary.json").stat().st_mtime == mtime


@background.job("demo_divergent_search_program")
def demo_divergent_search_program(folder):
    out = folder / "search"
    proc = background.run(
        "scripts/alpha_search.py", "--config", "demo", "--adapter", "lorta", "--rank", "1", "--multipliers",
        "1e17,1e13", "--floor", "1e6", "--steps", "2", "--out", str(out), "--no-progress",
        "--set", "train.crop_size=16", "--set", "data.val_max_chains=1", "--set", "optim.warmup_steps=0",
        "--set", "train.val_every=0", "--set", "train.num_threads=1", "--set", f"data.cache_dir={folder / 'cache'}")
    return proc, out


@pytest.mark.slow
def test_a_demo_search_whose_first_alphas_really_diverge_halves_and_continues(demo_data):
    """The demo configuration (ESM-2 8M, TS50), LoRTA r=1 at α so large that float32 overflows in the adapted
    attention or the gradient norm (NaN or inf; no loss threshold involved: the default 1e4 stays). The search
    halves on to the next stage and chooses a converged α there. Crops of 16 and 2 steps: seconds a candidate.
    alpha_search.py runs as a program, in the background while the in-process tests run."""
    proc, out = background.result("demo_divergent_search_program")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every candidate of stage 0 diverged: halving on" in proc.stderr
    state = json.loads((out / "search.json").read_text())
    first = [c for c in state["candidates"] if c["stage"] == 0]
    assert [c["alpha"] for c in first] == [1e17, 1e13]
    assert state["divergence_rule"].endswith("loss > 10000.0")  # the default rule, not a lowered threshold
    assert state["status"] == "chosen" and state["chosen"]["stage"] >= 1  # stage 1 is 5e12 and 5e8
    before = [c for c in state["candidates"] if c["stage"] < state["chosen"]["stage"]]
    assert all(c["diverged"] and c["divergence_rule"].startswith("non-finite") for c in before)
    chosen = [c for c in state["candidates"] if c["alpha"] == state["chosen"]["alpha"]][0]
    assert not chosen["diverged"] and chosen["status"] == "completed" and chosen["val_lddt_ca_final"] is not None
    assert (out / alpha_dir_name(chosen["alpha"]) / "adapter" / "adapter_config.json").is_file()
    assert chosen["val_baselines"]["n_chains"] == 1  # the chosen run beside the sequence-only baselines
    assert "Beside structures built from the length alone on the same 1 validation chain(s)" in \
        (out / "search.md").read_text()
