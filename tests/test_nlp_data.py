"""NLP harness data and objectives: GLUE files, the stand-ins, GLUE metrics, preference formats, DPO by hand."""

import json
import math

import pytest
import torch

from esmfold_peft.nlp import glue
from esmfold_peft.nlp.config import base_config
from esmfold_peft.nlp.preference import dpo_loss, dpo_metrics, read_pairs
from esmfold_peft.runtime.errors import ArtifactError, ConfigError

# --- DPO --------------------------------------------------------------------------------------------


def test_dpo_loss_and_rewards_match_the_formula_by_hand():
    beta = 0.1
    pc = torch.tensor([-10.0, -20.0, -5.0])  # policy log p(chosen)
    pr = torch.tensor([-12.0, -18.0, -5.0])  # policy log p(rejected)
    rc = torch.tensor([-11.0, -19.0, -5.0])  # reference
    rr = torch.tensor([-11.0, -19.0, -5.0])
    losses, crew, rrew = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: chosen reward 0.1*(1) = 0.1, rejected 0.1*(-1) = -0.1, margin 0.2
    # pair 1: chosen 0.1*(-1) = -0.1, rejected 0.1*(1) = 0.1, margin -0.2
    # pair 2: all equal: rewards 0, margin 0 (a tie counts as wrong, as in TRL)
    assert crew.tolist() == pytest.approx([0.1, -0.1, 0.0])
    assert rrew.tolist() == pytest.approx([-0.1, 0.1, 0.0])

    def by_hand(m):
        return -math.log(1.0 / (1.0 + math.exp(-m)))

    assert losses.tolist() == pytest.approx([by_hand(0.2), by_hand(-0.2), math.log(2.0)], rel=1e-6)
    m = dpo_metrics(losses, crew, rrew, pc, pr)
    assert m["loss"] == pytest.approx((by_hand(0.2) + by_hand(-0.2) + math.log(2)) / 3, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)
    assert m["logps/chosen"] == pytest.approx(-35 / 3)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), 0.1)
    losses.sum().backward()
    # d/dpc of -log σ(β(pc-pr)) at 0 = -β/2
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


# --- preference formats --------------------------------------------------------------------------


def test_three_preference_formats(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}) + "\n")
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Sure: ...",
                              "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}) + "\n")
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "2+2?"}],
                                     "chosen": {"from": "gpt", "value": "4"},
                                     "rejected": {"from": "gpt", "value": "5"}}]))
    (p,) = read_pairs(plain)
    assert p.messages == ({"role": "user", "content": "Name a colour."},) and (p.chosen, p.rejected) == ("Blue.", "Seven.")
    (h,) = read_pairs(hh)
    assert h.raw_prompt.endswith("Human: Joke?\n\nAssistant:") and h.chosen == " Sure: ..." and h.rejected == " No."
    (s,) = read_pairs(sharegpt)
    assert s.messages == ({"role": "user", "content": "2+2?"},) and (s.chosen, s.rejected) == ("4", "5")


def test_preference_record_without_rejected_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ArtifactError, match="record 0.*rejected"):
        read_pairs(bad)


# --- GLUE files and metrics ----------------------------------------------------------------------


def write_glue(root):
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nbad film \t0\nbroken line\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine \t1\n")
    (root / "CoLA").mkdir()
    (root / "CoLA" / "train.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (root / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tA dog ran.\n")
    (root / "MNLI").mkdir()
    header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    row = "0\t1\t1\tfiction\tx\tx\tx\tx\tA man sleeps.\tA man is awake.\tcontradiction\tcontradiction\n"
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (root / "MNLI" / name).write_text(header + row)
    (root / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (root / "STS-B" / "train.tsv").write_text(header + "0\tmain\tf\t2012\t1\tnone\tnone\tA cat.\tA feline.\t4.2\n")
    (root / "STS-B" / "dev.tsv").write_text(header + "0\tmain\tf\t2012\t1\tnone\tnone\tA dog.\tA car.\t0.4\n")


@pytest.mark.parametrize("task,first", [("sst2", ("good film ", None, 1)), ("cola", ("The cat sat.", None, 1)),
                                        ("mnli", ("A man sleeps.", "A man is awake.", 0)),
                                        ("stsb", ("A cat.", "A feline.", 4.2))])
def test_glue_tsvs_are_read_in_their_own_layouts(tmp_path, task, first):
    write_glue(tmp_path)
    cfg = base_config()
    cfg.task, cfg.data.glue_dir = task, str(tmp_path)
    spec, train, evals = glue.load_task(cfg)
    assert (train[0].text_a, train[0].text_b, train[0].label) == first
    assert set(evals) == {n for n, _ in spec.eval_files}
    if task == "sst2":
        assert len(train) == 2  # the malformed line is skipped


def test_glue_task_without_its_folder_names_it(tmp_path):
    write_glue(tmp_path)
    cfg = base_config()
    cfg.task, cfg.data.glue_dir = "rte", str(tmp_path)
    with pytest.raises(ArtifactError, match="RTE.*no such folder"):
        glue.load_task(cfg)
    cfg.data.glue_dir = ""
    with pytest.raises(ConfigError, match="data.glue_dir"):
        glue.load_task(cfg)


def test_glue_metrics_are_the_standard_ones():
    from scipy.stats import pearsonr, spearmanr

    cola = glue.compute_metrics(glue.TASKS["cola"], [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])
    tp, tn, fp, fn = 2, 2, 1, 0
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cola["mcc"] == pytest.approx(mcc) and cola["accuracy"] == pytest.approx(0.8)
    mrpc = glue.compute_metrics(glue.TASKS["mrpc"], [1, 1, 0, 0], [1, 0, 0, 1])
    assert mrpc == pytest.approx({"accuracy": 0.5, "f1": 0.5})
    p, y = [0.1, 2.0, 3.5, 4.9], [0.0, 2.5, 3.0, 5.0]
    stsb = glue.compute_metrics(glue.TASKS["stsb"], p, y)
    assert stsb["pearson"] == pytest.approx(pearsonr(p, y)[0]) and stsb["spearman"] == pytest.approx(spearmanr(p, y)[0])
    assert glue.TASKS["mnli"].eval_files[1][0] == "mismatched"


def test_scored_sentences_binary_by_sign_or_regression(tmp_path):
    path = tmp_path / "rt.txt"
    path.write_bytes(b"1_1\t2.5\tA fine film.\r\n1_2\t-1.0\tA bad one.\r\n1_3\t0.0\tMeh.\r\n")
    binary = glue.read_scored_sentences(path, regression=False)
    assert [(e.text_a, e.label) for e in binary] == [("A fine film.", 1), ("A bad one.", 0)]
    scores = glue.read_scored_sentences(path, regression=True)
    assert [e.label for e in scores] == [2.5, -1.0, 0.0]


def test_corr2cause_samples_become_premise_hypothesis_pairs(tmp_path):
    path = tmp_path / "c2c.jsonl"
    rec = {"input": [{"role": "system", "content": "Respond…"},
                     {"role": "user", "content": "Premise: A correlates with B. Hypothesis: A causes B."}],
           "ideal": "Answer: neutral"}
    path.write_text(json.dumps(rec) + "\n")
    (ex,) = glue.read_corr2cause(path)
    assert (ex.text_a, ex.text_b, ex.label) == ("A correlates with B.", "A causes B.", 2)


def test_split_and_subset_are_deterministic_and_disjoint():
    examples = [glue.Example(f"s{i}", None, i % 2) for i in range(500)]
    train, evals = glue.split_examples(examples, 0.2)
    assert not {e.text_a for e in train} & {e.text_a for e in evals["dev"]}
    assert 60 < len(evals["dev"]) < 140
    assert glue.subset(train, 50) == glue.subset(list(train), 50) and len(glue.subset(train, 50)) == 50
