"""Many adapters over one network (nlp/infer.py `load_runs`): the rows of one batch carry different runs'
adapters (and, for classification, heads), and each row gets exactly what its run gives it alone."""

import contextlib
import io
import json

import pytest
import torch

from esmfold_peft.adapters import get_adapter_set, has_adapters
from esmfold_peft.nlp.infer import class_logits, classify, generate, generate_ids, load_run, load_runs, prompt_ids
from esmfold_peft.nlp.train import train
from test_nlp_export import PROMPTS, SENTENCES, predict
from test_nlp_lm import alpaca_file, lm_cfg  # noqa: F401 (alpaca_file is a fixture)
from test_nlp_train import scored_file, tiny_cfg  # noqa: F401 (scored_file is a fixture)

TOL = dict(rtol=1e-4, atol=1e-4)  # float reassociation of the batched per-row products (adapters/mixed.py)


def trained(folder, cfg, **changes):
    """Train `cfg` with `changes` ("section.key": value) into `folder`; every run has train.seed 0 and the same
    model config, so the same random base network; each keeps its last adapter (never the zero one of step 0)."""
    cfg.train.keep = "last"
    for key, value in changes.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    assert train(cfg, folder, progress=False) == 0
    return folder


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory, scored_file):
    """Three LoRTA classification runs on one base, with adapters (and heads) of other ranks, scales and lengths;
    learning rates high enough that a tiny random encoder's outputs move visibly."""
    root = tmp_path_factory.mktemp("cls")
    return {"r2": trained(root / "r2", tiny_cfg(scored_file, steps=4), **{"optim.lr": 0.3}),
            "r4": trained(root / "r4", tiny_cfg(scored_file, steps=4), **{"adapter.rank": 4, "adapter.alpha": 16.0,
                                                                          "optim.lr": 0.5}),
            "long": trained(root / "long", tiny_cfg(scored_file, steps=6), **{"adapter.alpha": 8.0, "optim.lr": 0.2})}


@pytest.fixture(scope="module")
def other_cls_runs(tmp_path_factory, scored_file):
    """A head-only run and a LoRA run on the same base: neither can join the LoRTA runs."""
    root = tmp_path_factory.mktemp("other")
    return {"head": trained(root / "head", tiny_cfg(scored_file, method="none", steps=2)),
            "lora": trained(root / "lora", tiny_cfg(scored_file, method="lora", steps=2))}


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, alpaca_file):
    """Three LoRA instruction-tuning runs on one random Llama (grouped-query attention)."""
    root = tmp_path_factory.mktemp("lm")

    def cfg(steps):
        c = lm_cfg("alpaca", alpaca_file, method="lora", steps=steps)
        c.eval.generations = 0
        return c

    return {"l4": trained(root / "l4", cfg(2)),
            "l2": trained(root / "l2", cfg(3), **{"adapter.rank": 2, "adapter.alpha": 8.0, "optim.lr": 2e-2}),
            "l8": trained(root / "l8", cfg(2), **{"adapter.rank": 8, "adapter.alpha": 16.0})}


def mixed_rows(names, texts):
    """Every text with every adapter name, the names rotating so that a batch holds them all."""
    return [(t, names[(i + j) % len(names)]) for i, t in enumerate(texts) for j in range(len(names))]


def solo(runs, name, first):
    """What `name`'s rows get alone: its run by itself (None: the first run without its adapter)."""
    return load_run(runs[name]) if name is not None else load_run(runs[first], adapter=False)


def test_a_mixed_classification_batch_equals_each_run_alone(cls_runs):
    mixed = load_runs(cls_runs.values())
    assert mixed.names == ("r2", "r4", "long") and mixed.labels == ("0", "1")
    rows = mixed_rows([*cls_runs, None], SENTENCES)  # 16 rows: each sentence with the three adapters and the base
    texts, adapters = [(t, None) for t, _ in rows], [a for _, a in rows]
    got = class_logits(mixed, texts, batch_size=len(rows), adapters=adapters)  # one batch
    torch.testing.assert_close(class_logits(mixed, texts, batch_size=5, adapters=adapters), got, **TOL)
    runs = {name: solo(cls_runs, name, "r2") for name in [*cls_runs, None]}
    alone = {}
    for name, run in runs.items():
        alone[name] = class_logits(run, [(s, None) for s in SENTENCES])
        if name is not None:  # the adapter itself matters, not only the run's head
            without = class_logits(load_run(cls_runs[name], adapter=False), [(s, None) for s in SENTENCES])
            assert (alone[name] - without).abs().max() > 10 * TOL["atol"]
    for i, ((text, _), name) in enumerate(zip(texts, adapters)):
        torch.testing.assert_close(got[i], alone[name][SENTENCES.index(text)], **TOL)
    for a in alone:  # every two choices give visibly different outputs
        for b in alone:
            if a != b:
                assert (alone[a] - alone[b]).abs().max(-1).values.min() > 10 * TOL["atol"], (a, b)
    labelled = classify(mixed, texts, batch_size=len(rows), adapters=adapters)
    want = [classify(runs[n], [t])[0] for t, n in zip(texts, adapters)]
    assert [r["label"] for r in labelled] == [r["label"] for r in want]
    torch.testing.assert_close(torch.tensor([r["probability"] for r in labelled]),
                               torch.tensor([r["probability"] for r in want]), **TOL)


def sharpen(loaded):
    """Sharper logits (a tiny random network's greedy answers then differ from prompt to prompt, and from
    adapter to adapter): weights ×8 but the norms', adapters included; the mixed copies of the adapters re-made."""
    model = loaded.net.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    if has_adapters(model) and get_adapter_set(model).mixed is not None:
        aset = get_adapter_set(model)
        for name in list(aset.mixed.names):
            aset.mix(name)  # the factors are copied when mixed: copy the sharpened ones
    return loaded


def test_one_generate_call_with_several_adapters_equals_each_prompt_alone(lm_runs):
    mixed = sharpen(load_runs(lm_runs.values()))
    choices = [*lm_runs, None]
    records = [PROMPTS[0]] * len(choices) + [PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    adapters = choices + ["l2", "l8", None]
    got = generate_ids(mixed, records, 10, batch_size=len(records), adapters=adapters)  # one generate call
    for name in choices:
        run = sharpen(solo(lm_runs, name, "l4"))
        for i in [i for i, a in enumerate(adapters) if a == name]:
            assert got[i] == generate_ids(run, [records[i]], max_new_tokens=10)[0], (i, name)
    assert len({tuple(g) for g in got[:len(choices)]}) == len(choices)  # each adapter answers the prompt otherwise
    assert len({len(prompt_ids(mixed.net.tokenizer, r)) for r in records}) == 3  # the batch is left-padded
    assert max(map(len, got)) == 10  # and answered over many key-value cache steps
    assert generate(mixed, records, 10, batch_size=3, adapters=adapters) == \
        [mixed.net.tokenizer.decode(g, skip_special_tokens=True).strip() for g in got]


def tsv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predict_takes_an_adapter_column_and_a_default(cls_runs, tmp_path, capsys):
    runs = [a for run in cls_runs.values() for a in ("--run", run)]
    rows = [(SENTENCES[0], "r4"), (SENTENCES[1], "base"), (SENTENCES[2], ""), (SENTENCES[3], "r2"),
            (SENTENCES[0], "long")]
    src = tsv(tmp_path / "in.tsv", ["sentence\tadapter"] + [f"{s}\t{a}" if a else s for s, a in rows])
    assert predict(runs + ["--tsv", src, "--out", tmp_path / "out.tsv", "--adapter", "long", "--batch-size", 4]) == 0
    assert "5 sentences labelled over one network (rows per adapter: r2 1, r4 1, long 2, base 1)" in \
        capsys.readouterr().out
    lines = [l.split("\t") for l in (tmp_path / "out.tsv").read_text().splitlines()]
    assert lines[0] == ["sentence", "adapter", "label", "probability"]
    assert [l[:2] for l in lines[1:]] == [[s, a or "long"] for s, a in rows]
    adapters = [None if a == "base" else a or "long" for _, a in rows]
    want = classify(load_runs(cls_runs.values()), [(s, None) for s, _ in rows], adapters=adapters)
    assert [l[2] for l in lines[1:]] == [w["label"] for w in want]
    torch.testing.assert_close(torch.tensor([float(l[3]) for l in lines[1:]]),
                               torch.tensor([w["probability"] for w in want]), atol=2e-6, rtol=0)
    # one run, no adapter column: --adapter base is --no-adapter, with the adapter written beside
    plain = tsv(tmp_path / "plain.tsv", SENTENCES)
    assert predict(["--run", cls_runs["r4"], "--tsv", plain, "--out", tmp_path / "base.tsv", "--adapter", "base"]) == 0
    assert predict(["--run", cls_runs["r4"], "--tsv", plain, "--out", tmp_path / "none.tsv", "--no-adapter"]) == 0
    base = [l.split("\t") for l in (tmp_path / "base.tsv").read_text().splitlines()]
    assert [l[1] for l in base] == ["adapter"] + ["base"] * 4
    assert [l[:1] + l[2:] for l in base] == [l.split("\t") for l in (tmp_path / "none.tsv").read_text().splitlines()]


def test_predict_answers_prompts_with_their_adapters(lm_runs, tmp_path):
    records = [{**PROMPTS[0], "adapter": "l8"}, PROMPTS[1], {**PROMPTS[2], "adapter": "base"}, {**PROMPTS[0]}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [a for run in lm_runs.values() for a in ("--run", run)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict(runs + ["--jsonl", src, "--out", tmp_path / "out.jsonl", "--adapter", "l2",
                               "--max-new-tokens", 4]) == 0
    answers = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    adapters = ["l8", "l2", None, "l2"]
    assert [a["adapter"] for a in answers] == ["l8", "l2", "base", "l2"]
    assert [{k: v for k, v in a.items() if k not in ("adapter", "response")} for a in answers] == \
        [{k: v for k, v in r.items() if k != "adapter"} for r in records]
    assert [a["response"] for a in answers] == generate(load_runs(lm_runs.values()), records, 4, adapters=adapters)


@pytest.mark.parametrize("case,message", [
    ("unknown adapter", "in.tsv: line 3: no adapter named 'r3'; known: r2, r4, long, base (the base model)"),
    ("no default", "in.tsv: line 3: names no adapter, and with several runs there is no default: give --adapter"),
    ("unknown default", "--adapter r9: no such adapter; known: r2, r4, long, base"),
    ("head-only run", "head: a head-only run (adapter.method=none) has no adapter to serve beside others'"),
    ("lorta and lora", "LoRTA and LoRA adapters cannot share one mixed batch"),
    ("two of one name", "2 runs are named 'r2'"),
    ("no-adapter and a column", "--no-adapter runs one run's base model for every row"),
])
def test_mixing_refuses_in_one_line(cls_runs, other_cls_runs, tmp_path, capsys, case, message):
    runs = [a for run in cls_runs.values() for a in ("--run", run)]
    lines = ["sentence\tadapter", f"{SENTENCES[0]}\tr2", f"{SENTENCES[1]}\tr3" if case == "unknown adapter" else
             SENTENCES[1]]
    extra = {"unknown adapter": ["--adapter", "r4"], "unknown default": ["--adapter", "r9"],
             "head-only run": ["--run", other_cls_runs["head"], "--adapter", "base"],
             "lorta and lora": ["--run", other_cls_runs["lora"], "--adapter", "base"],
             "two of one name": ["--run", f"r2={other_cls_runs['lora']}", "--adapter", "base"],
             "no-adapter and a column": ["--no-adapter"]}.get(case, [])
    out = tmp_path / "out.tsv"
    assert predict(runs + extra + ["--tsv", tsv(tmp_path / "in.tsv", lines), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not out.exists()
