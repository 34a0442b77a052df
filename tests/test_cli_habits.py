"""Habits every script shares: examples that parse, plain YAML from --print-config, config lists that
are the configs there are, no traceback on a closed pipe, one syntax for sweep entries."""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fold_fixtures import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


class _Parsed(BaseException):
    """Raised right after a script's parser accepted its arguments: nothing runs (not an Exception, so no
    script's error handling catches it)."""


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def example_commands(text: str) -> list[str]:
    """The `python scripts/...` command lines of a help text, continuation lines (trailing backslash) joined."""
    commands, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and not stripped.startswith("python scripts/"):
            continue
        current = stripped if current is None else f"{current} {stripped}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = None
    assert current is None, f"a continuation line ends the help text: {current!r}"
    return commands


def parses(name: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """The script's own parser accepts argv (its main is stopped right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        load_script(name).main(argv)
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{name}: main returned without parsing its arguments")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_example_in_a_help_text_parses(name, capsys, monkeypatch):
    for command in example_commands(help_text(name, capsys)):
        words = shlex.split(command, comments=True)  # a broken continuation or quote fails here
        assert words[:2] == ["python", f"scripts/{name}.py"], f"{name}'s help shows another script: {command}"
        try:
            parses(name, words[2:], monkeypatch)
        except SystemExit:
            pytest.fail(f"{name}: its parser refuses its own example {command!r}: {capsys.readouterr().err.strip()}")


def test_the_example_reader_joins_continuations():
    text = ("Examples:\n  python scripts/a.py --x 1 \\\n      --y 2   # note\n  torchrun scripts/a.py ...\n"
            "  python scripts/a.py --z\n")
    assert example_commands(text) == ["python scripts/a.py --x 1 --y 2   # note", "python scripts/a.py --z"]


def test_count_params_has_help_texts_examples_and_a_table(capsys):
    parser = load_script("count_params").build_parser()
    assert all(action.help for action in parser._actions), "every argument has a help text"
    text = help_text("count_params", capsys)
    assert "Examples:" in text and "--json" in text and "Exit status: 0 done" in text
    assert load_script("count_params").main(["--arch", "roberta-base", "--adapter", "lorta", "--rank", "4"]) == 0
    table = capsys.readouterr().out
    assert "trainable parameters  3,440\n" in table and "closed form           3,440 (agrees)" in table


def _pipe(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_traceback_when_the_reader_closes_the_pipe():
    py = shlex.quote(sys.executable)
    count = f"{py} scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8"
    head = _pipe(f"{count} | head -1")
    assert head.stdout.startswith("architecture") and head.stderr == "", head.stderr
    writer = subprocess.Popen(  # far more than a pipe holds: a write itself breaks once the reader is gone
        [sys.executable, "-c", "import sys; from esmfold_peft.runtime.cli import run_main; "
                               "sys.exit(run_main(lambda: [print(i) for i in range(200000)] and 0))"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "0\n"
    writer.stdout.close()
    assert writer.wait(timeout=300) == 1 and writer.stderr.read() == ""
    writer.stderr.close()


def test_a_broken_pipe_in_process_is_exit_1_without_a_word(capsys):
    from esmfold_peft.runtime.cli import run_main

    def main():
        raise BrokenPipeError(32, "Broken pipe")

    assert run_main(main) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,argv,keys", [
    ("train_fold", ["--rank", "4", "--steps", "7"],
     {("adapter", "rank"): 4, ("train", "steps"): 7, ("optim", "betas"): [0.9, 0.999]}),
    ("train_nlp", ["--task", "rt-polarity", "--adapter", "lorta", "--rank", "2"],
     {("adapter", "rank"): 2, ("adapter", "targets"): ["q", "k", "v", "o"], ("optim", "betas"): [0.9, 0.999]}),
])
def test_print_config_is_plain_yaml(name, argv, keys, capsys):
    assert load_script(name).main(argv + ["--print-config"]) == 0
    text = capsys.readouterr().out
    assert "!!" not in text
    data = yaml.safe_load(text)
    for (section, key), value in keys.items():
        assert data[section][key] == value
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_config_yaml_writes_tuples_as_lists_and_paths_as_text():
    import ml_collections as mlc

    from esmfold_peft.runtime.cli import config_yaml

    cfg = mlc.ConfigDict({"a": (1, 2), "b": {"c": Path("x/y"), "d": None, "e": 1.5}, "f": ["g"]})
    assert yaml.safe_load(config_yaml(cfg)) == {"a": [1, 2], "b": {"c": "x/y", "d": None, "e": 1.5}, "f": ["g"]}


@pytest.mark.parametrize("name,nlp", [("train_fold", False), ("train_nlp", True), ("sweep", False),
                                      ("sweep_nlp", True)])
def test_config_help_lists_the_configs_there_are(name, nlp, capsys):
    text = " ".join(help_text(name, capsys).split())
    listed = re.search(r"--config CONFIG a config name in configs/ \(([^)]*)\)", text).group(1).split(", ")
    there = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem.startswith("nlp_") == nlp)
    assert listed == there and len(listed) >= 3
    if nlp:
        from esmfold_peft.nlp.config import load_config
    else:
        from esmfold_peft.fold.run.config import load_config
    for config in listed:
        assert load_config(config).name == config


def test_sweep_entries_share_one_syntax():
    from esmfold_peft.fold.experiments.sweep import parse_runs
    from esmfold_peft.nlp.sweep import DEFAULT_GRID, parse_grid

    assert parse_runs("lorta:4,lora:8,none,full") == [("lorta", 4), ("lora", 8), ("none", None), ("full", None)]
    assert parse_grid("lorta:4,lora:8,none,full") == (("lorta", 4), ("lora", 8), ("none", 0), ("full", 0))
    assert parse_grid("lorta-r4, lora-r8, head-only") == (("lorta", 4), ("lora", 8), ("none", 0))  # the old form
    assert parse_grid(None) == parse_grid("") == DEFAULT_GRID


@pytest.mark.parametrize("text,message", [
    ("lorta", "expected lorta:RANK, lora:RANK, none or full"), ("lorta:0", "expected lorta:RANK"),
    ("none:4", "none takes no rank"), ("lorta:4,lorta-r4", "listed twice"), ("dora:4", "expected lorta:RANK"),
])
def test_sweep_nlp_refuses_bad_entries_in_one_line(text, message, capsys):
    assert load_script("sweep_nlp").main(["--runs", text]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: --runs entry")


def test_sweep_nlp_reads_runs_and_the_old_methods_flag(monkeypatch, capsys):
    assert parses("sweep_nlp", ["--runs", "lorta:4,none"], monkeypatch).runs == "lorta:4,none"
    assert parses("sweep_nlp", ["--methods", "lorta-r4"], monkeypatch).runs == "lorta-r4"
    text = " ".join(help_text("sweep_nlp", capsys).split())
    assert "--runs ENTRIES, --methods ENTRIES" in text and "Deprecated, still read: the old name --methods" in text


def test_loading_a_hugging_face_checkpoint_prints_no_escape_codes(tmp_path, capfd):
    """transformers' load report (coloured with ANSI codes even into a file) stays out of the output."""
    from transformers import BertConfig, BertModel

    from esmfold_peft.nlp.config import base_config
    from esmfold_peft.nlp.models import build_classifier, byte_tokenizer

    folder = tmp_path / "tiny_bert"
    tokenizer = byte_tokenizer("encoder")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capfd.readouterr()
    cfg = base_config()
    cfg.model.name = str(folder)
    network = build_classifier(cfg, num_labels=2)  # the classifier is MISSING from the checkpoint: a report
    out, err = capfd.readouterr()
    assert network.head_names and "\x1b" not in out + err and "LOAD REPORT" not in out + err, out + err


def test_the_readme_export_example_works_on_a_run_that_adapted_its_language_model(tiny_lorta_run, tmp_path, capsys):
    """The README's export command, on a run like the demo's (LoRTA on ESM-2): it needs --lm-out, and has it."""
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"`(python scripts/export_esmfold\.py [^`]*)`", readme)
    words = shlex.split(command)[2:]
    assert "--lm-out" in words and words[words.index("--run") + 1] == "runs/demo-lorta-r8"
    values = {"--run": str(tiny_lorta_run), "--out": str(tmp_path / "esmfold_mine.pt"),
              "--lm-out": str(tmp_path / "esm2_mine.pt")}
    argv = [values.get(words[i - 1], w) if i else w for i, w in enumerate(words)]
    # the tiny run's 2-layer language model has no fair-esm name of its own: the demo's ESM-2 8M derives one
    assert load_script("export_esmfold").main(argv + ["--esm-type", "esm2_8M"]) == 0, capsys.readouterr().err
    assert (tmp_path / "esmfold_mine.pt").is_file() and (tmp_path / "esm2_mine.pt").is_file()
    without = [w for i, w in enumerate(argv) if "--lm-out" not in (w, argv[i - 1] if i else "")]
    assert load_script("export_esmfold").main(without + ["--esm-type", "esm2_8M"]) == 2
    assert "--lm-out" in capsys.readouterr().err
