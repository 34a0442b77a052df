"""Inference with trained NLP runs (tiny random networks): a run exported as a plain Hugging Face folder gives
the run's outputs, sentences labelled and prompts answered from the run, and unusable inputs in one line."""

import contextlib
import io
import json
import shutil

import pytest
import torch

from esmfold_peft.nlp.config import config_for_resume
from esmfold_peft.nlp.infer import (generate, generate_batch, load_run, prompt_ids, read_sentences,
                                    write_folder_atomically)
from esmfold_peft.nlp.models import build_causal_lm, build_classifier, load_trainable_state, prepare_training
from esmfold_peft.nlp.train import train
from esmfold_peft.runtime.artifacts import load_safetensors, torch_load
from esmfold_peft.runtime.errors import ArtifactError
from esmfold_peft.runtime.rundir import RunDir
from fold_fixtures import load_script
from test_nlp_lm import alpaca_file, lm_cfg  # noqa: F401 (alpaca_file is a fixture)
from test_nlp_train import scored_file, tiny_cfg  # noqa: F401 (scored_file is a fixture)

SENTENCES = ["a wonderful moving film", "terrible acting, boring", "funny", "a waste of time, ugly"]  # < 30 bytes
PROMPTS = [{"instruction": "Tell me the colour of snow."}, {"prompt": "Why?"},
           {"instruction": "Tell me the colour of grass.", "input": "Question 3, a longer one than the others"}]


def export(argv) -> int:
    return load_script("export_nlp").main([str(a) for a in argv])


def predict(argv) -> int:
    return load_script("predict_nlp").main([str(a) for a in argv] + ["--no-progress"])


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, scored_file):
    run = tmp_path_factory.mktemp("cls") / "run"
    assert train(tiny_cfg(scored_file, steps=4), run, progress=False) == 0
    return run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, alpaca_file):
    cfg = lm_cfg("alpaca", alpaca_file, method="lora", steps=2)
    cfg.eval.generations = 0
    run = tmp_path_factory.mktemp("lm") / "run"
    assert train(cfg, run, progress=False) == 0
    return run


@pytest.fixture(scope="module")
def cls_hf(cls_run, tmp_path_factory):
    """The classification run exported, and what the export printed."""
    out = tmp_path_factory.mktemp("cls_hf") / "hf"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert export(["--run", cls_run, "--out", out]) == 0
    return out, printed.getvalue()


def trained_network(run, build):
    """The network as training left it, without load_adapter: the run's seed, its adapter put on again and
    the trained parameters of the kept checkpoint copied in."""
    cfg = config_for_resume(RunDir(run).read_config(), [])  # the run's config as stored
    torch.manual_seed(cfg.train.seed)
    net = build(cfg)
    prepare_training(net, cfg)
    load_trainable_state(net.model, torch_load(RunDir(run).best_checkpoint)["trainable"], "best.pt")
    return net.model.eval()


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits.float()


def test_a_lorta_classifier_exports_to_transformers_with_the_run_outputs(cls_run, cls_hf):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cls_hf, printed = cls_hf
    assert "lorta adapter merged" in printed and "next: AutoModelForSequenceClassification.from_pretrained(" in printed
    hf = AutoModelForSequenceClassification.from_pretrained(str(cls_hf)).eval()
    assert hf.config.id2label == {0: "0", 1: "1"} and not any("lorta" in n for n, _ in hf.named_parameters())
    batch = dict(AutoTokenizer.from_pretrained(str(cls_hf))(SENTENCES, padding=True, return_tensors="pt"))
    run = load_run(cls_run)  # the adapter (unmerged) and, with it, the head saved beside it
    assert run.adapter and run.labels == ("0", "1")
    reference = logits(trained_network(cls_run, lambda cfg: build_classifier(cfg, 2)), batch)
    torch.testing.assert_close(logits(run.net.model, batch), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(hf, batch), reference, atol=1e-5, rtol=0)
    head = load_safetensors(cls_run / "adapter" / "head.safetensors")
    assert all(torch.equal(dict(hf.named_parameters())[n], v) for n, v in head.items())
    base = logits(load_run(cls_run, adapter=False).net.model, batch)  # the trained head, no adapter
    assert not torch.allclose(base, reference, atol=1e-6)


def test_a_lora_causal_lm_exports_to_transformers_with_the_run_outputs(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is taken
    assert export(["--run", lm_run, "--out", out]) == 0
    assert "next: AutoModelForCausalLM.from_pretrained(" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = dict(tokenizer(["Tell me the colour of snow.", "Why?"], padding=True, return_tensors="pt"))
    reference = logits(trained_network(lm_run, build_causal_lm), batch)
    torch.testing.assert_close(logits(load_run(lm_run).net.model, batch), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(hf, batch), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(load_run(lm_run, adapter=False).net.model, batch), reference, atol=1e-6)
    (out / "stale.txt").write_text("replaced")  # --overwrite replaces a folder that holds something
    assert export(["--run", lm_run, "--out", out, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left beside it


def test_predicted_labels_are_the_exported_models_argmax(cls_run, cls_hf, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cls_hf = cls_hf[0]

    tsv = tmp_path / "sentences.tsv"
    tsv.write_text("sentence\n" + "\n".join(SENTENCES[:2]) + "\n\n" + "\n".join(SENTENCES[2:]) + "\n")
    assert predict(["--run", cls_run, "--tsv", tsv, "--out", tmp_path / "labels.tsv", "--batch-size", 3]) == 0
    assert "4 sentences labelled" in capsys.readouterr().out
    lines = (tmp_path / "labels.tsv").read_text().splitlines()
    assert lines[0] == "sentence\tlabel\tprobability" and [l.split("\t")[0] for l in lines[1:]] == SENTENCES
    hf = AutoModelForSequenceClassification.from_pretrained(str(cls_hf)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(cls_hf))
    probs = logits(hf, dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))).softmax(-1)
    best = probs.argmax(-1)
    assert [l.split("\t")[1] for l in lines[1:]] == [hf.config.id2label[int(i)] for i in best]
    got = torch.tensor([float(l.split("\t")[2]) for l in lines[1:]])
    torch.testing.assert_close(got, probs.max(-1).values, atol=2e-6, rtol=0)
    assert predict(["--run", cls_run, "--tsv", tsv, "--out", tmp_path / "base.tsv", "--no-adapter"]) == 0
    assert (tmp_path / "base.tsv").read_text() != (tmp_path / "labels.tsv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.tsv", "labels.tsv", "sentences.tsv"]  # atomic


@pytest.mark.parametrize("method,task", [("none", "rt-polarity"), ("full", "rt-polarity"), ("lora", "rt-score")])
def test_head_only_full_and_regression_runs_export_and_predict(scored_file, tmp_path, method, task):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, out = tmp_path / "run", tmp_path / "hf"
    assert train(tiny_cfg(scored_file, method=method, task=task, steps=2), run, progress=False) == 0
    assert export(["--run", run, "--out", out]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    batch = dict(AutoTokenizer.from_pretrained(str(out))(SENTENCES, padding=True, return_tensors="pt"))
    num_labels = 1 if task == "rt-score" else 2
    reference = logits(trained_network(run, lambda cfg: build_classifier(cfg, num_labels)), batch)
    torch.testing.assert_close(logits(hf, batch), reference, atol=1e-5, rtol=0)
    (tmp_path / "in.tsv").write_text("\n".join(SENTENCES) + "\n")
    assert predict(["--run", run, "--tsv", tmp_path / "in.tsv", "--out", tmp_path / "out.tsv"]) == 0
    lines = [l.split("\t") for l in (tmp_path / "out.tsv").read_text().splitlines()]
    if task == "rt-score":  # the label is the score
        assert lines[0] == ["sentence", "label"]
        torch.testing.assert_close(torch.tensor([float(l[1]) for l in lines[1:]]), reference[:, 0], atol=1e-5, rtol=0)
    else:
        assert [l[1] for l in lines[1:]] == [hf.config.id2label[int(i)] for i in reference.argmax(-1)]


def test_batched_generation_equals_each_prompt_alone(lm_run, tmp_path, capsys):
    run = load_run(lm_run)
    model, tokenizer = run.net.model, run.net.tokenizer
    with torch.no_grad():  # sharper logits: a tiny random network's greedy answers then differ from prompt to prompt
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    ids = [prompt_ids(tokenizer, r) for r in PROMPTS]
    assert len({len(i) for i in ids}) == 3  # the batch is padded
    batched = generate_batch(model, tokenizer, ids, max_new_tokens=12)
    alone = [generate_batch(model, tokenizer, [i], max_new_tokens=12)[0] for i in ids]
    assert batched == alone and len({tuple(a) for a in alone}) == 3
    # the script: the records back, each with the answer that generate gives it
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    assert predict(["--run", lm_run, "--jsonl", prompts, "--out", tmp_path / "answers.jsonl",
                    "--max-new-tokens", 5, "--batch-size", 2]) == 0
    assert "3 answers" in capsys.readouterr().out
    answers = [json.loads(l) for l in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in a.items() if k != "response"} for a in answers] == PROMPTS
    assert [a["response"] for a in answers] == generate(load_run(lm_run), PROMPTS, 5, batch_size=3)


def damaged_copy(run, tmp_path, fault):
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    if fault == "no adapter":
        shutil.rmtree(copy / "adapter")
    elif fault == "no config":
        (copy / "config.json").unlink()
    elif fault == "a folding run":
        (copy / "config.json").write_text(json.dumps({"name": "demo", "model": {"lm": {}}}))
    else:
        weights = copy / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-40])
    return copy


@pytest.mark.parametrize("case,message", [
    ("missing run", "nowhere: no such run directory"),
    ("non-empty out", "out: exists and is not empty; give a new --out, or --overwrite"),
    ("no adapter", "adapter: no such folder: the run (status: completed) has not written its trained adapter"),
    ("no config", "config.json: no such file"),
    ("a folding run", "config.json: names no task: not the config of an NLP run"),
    ("damaged adapter", "adapter_model.safetensors:"),
])
def test_export_refuses_in_one_line(cls_run, tmp_path, capsys, case, message):
    run = {"missing run": tmp_path / "nowhere", "non-empty out": cls_run}.get(case) or damaged_copy(
        cls_run, tmp_path, case)
    out = tmp_path / "out"
    if case == "non-empty out":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    assert export(["--run", run, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert (out / "mine.txt").read_text() == "keep me" if case == "non-empty out" else not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder


@pytest.mark.parametrize("case,content,message", [
    ("malformed jsonl", '{"prompt": "Hi"}\n{"prompt": "Hi"\n', "prompts.jsonl: line 2: not valid JSON"),
    ("jsonl without a prompt", '{"prompt": "Hi"}\n\n{"text": "Hi"}\n', "prompts.jsonl: line 3: needs exactly one"),
    ("empty jsonl", "\n", "prompts.jsonl: empty file: no prompts"),
    ("tsv for a language model", "a sentence\n", "was trained on alpaca (a language model): give --jsonl"),
    ("bad tsv columns", "sentence\ngood\nleft\tright\n", "sentences.tsv: line 3: 2 tab-separated columns"),
    ("missing tsv", None, "sentences.tsv: no such sentence file"),
])
def test_predict_refuses_bad_inputs_in_one_line(cls_run, lm_run, tmp_path, capsys, case, content, message):
    flag = "--tsv" if "tsv" in case else "--jsonl"
    path = tmp_path / ("sentences.tsv" if flag == "--tsv" else "prompts.jsonl")
    if content is not None:
        path.write_text(content)
    run = lm_run if "jsonl" in case or "language model" in case else cls_run
    assert predict(["--run", run, flag, path, "--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_sentence_pairs_and_headers(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\nA premise.\tA hypothesis.\n")
    assert read_sentences(path, 2) == [("A premise.", "A hypothesis.")]
    path.write_text("sentence\tsentence2\n")  # not the header of either kind: a first pair, read as such
    assert read_sentences(path, 2) == [("sentence", "sentence2")]
    with pytest.raises(ArtifactError, match="line 1: 2 tab-separated columns; this task takes one sentence"):
        read_sentences(path, 1)


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fails(folder):
        (folder / "half.bin").write_bytes(b"12")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomically(out, fails, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
