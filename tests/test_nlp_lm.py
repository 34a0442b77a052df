"""Instruction tuning and DPO on a tiny random Llama with grouped-query attention (4 query / 2 key-value heads)."""

import json
import math

import pytest
import torch

from esmfold_peft.nlp.config import base_config, config_for_resume, resolve_defaults
from esmfold_peft.nlp.instruct import encode_turn, response_logps
from esmfold_peft.nlp.models import build_causal_lm, byte_tokenizer, prepare_training
from esmfold_peft.nlp.preference import REFERENCE_FILE
from esmfold_peft.nlp.tasks import pad_batch
from esmfold_peft.nlp.train import train
from esmfold_peft.runtime.artifacts import load_safetensors
from esmfold_peft.runtime.errors import ConfigError
from esmfold_peft.runtime.rundir import RunDir

ANSWERS = {"colour of the sky": "Blue.", "colour of grass": "Green.", "colour of snow": "White.",
           "colour of coal": "Black."}


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    records = [{"instruction": f"Tell me the {q}.", "input": "" if i % 2 else f"Question {i}",
                "output": a} for i in range(12) for q, a in ANSWERS.items()]
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def dpo_file(tmp_path_factory):
    lines = []
    for i in range(40):
        q, a = list(ANSWERS.items())[i % 4]
        lines.append({"conversations": [{"from": "human", "value": f"{i}: what is the {q}?"}],
                      "chosen": {"from": "gpt", "value": a}, "rejected": {"from": "gpt", "value": "I refuse, sorry!"}})
    path = tmp_path_factory.mktemp("dpo") / "dpo.json"
    path.write_text(json.dumps(lines))
    return path


def lm_cfg(task, data, method="lora", steps=8):
    cfg = base_config()
    cfg.name = "test"
    cfg.task = task
    cfg.model.name = "random"
    cfg.model.max_length = 256  # byte-level tokens: the Alpaca template alone is ~150
    cfg.model.random.family = "llama"
    cfg.model.random.num_heads = 4
    cfg.model.random.num_kv_heads = 2
    cfg.data.path = str(data)
    cfg.data.eval_fraction = 0.25
    cfg.data.max_eval = 8
    cfg.adapter.method = method
    cfg.adapter.rank = 4
    cfg.optim.lr = 1e-2
    cfg.optim.schedule = "constant"
    cfg.train.steps = steps
    cfg.train.batch_size = 8
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 4
    cfg.train.num_threads = 1
    cfg.eval.generations = 2
    cfg.eval.max_new_tokens = 6
    cfg.dpo.max_prompt_length = 48
    return resolve_defaults(cfg)


def test_alpaca_template_masks_the_prompt_and_ends_with_eos():
    tok = byte_tokenizer("decoder")
    row = encode_turn(tok, [{"role": "user", "content": "Say hi."}], "Hi!", max_length=400)
    n_resp = sum(1 for t in row["labels"] if t != -100)
    assert n_resp == len("Hi!") + 1 and row["labels"][-1] == tok.eos_token_id
    prompt = tok.decode(row["input_ids"][:len(row["input_ids"]) - n_resp], skip_special_tokens=True)
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert encode_turn(tok, [{"role": "user", "content": "x" * 500}], "Hi", max_length=100) is None
    kept = encode_turn(tok, [{"role": "user", "content": "x" * 500}], "Hi", max_length=100, max_prompt_length=50)
    assert len(kept["input_ids"]) == 50 + 3  # the prompt's end is kept


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = byte_tokenizer("decoder")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    row = encode_turn(tok, [{"role": "user", "content": "Q?"}], "A.", max_length=200)
    response = [t for t in row["labels"] if t != -100]
    assert tok.decode(response) == "A.<|end|>"
    assert tok.decode(row["input_ids"][:len(row["input_ids"]) - len(response)]) == "<|user|>Q?<|end|><|assistant|>"


def test_instruction_tuning_lowers_held_out_response_loss(tmp_path, alpaca_file):
    cfg = lm_cfg("alpaca", alpaca_file, steps=10)
    assert train(cfg, tmp_path / "run", progress=False) == 0
    s = RunDir(tmp_path / "run").read_summary()
    assert s["layout"] == {"family": "hf-llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                           "head_dim": 8}
    assert s["primary_metric"] == "response_loss" and not s["higher_is_better"]
    assert s["primary_final"] < s["primary_initial"] - 0.1
    assert s["eval_final"]["perplexity"] == pytest.approx(math.exp(s["primary_final"]), rel=1e-6)
    gens = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and {"instruction", "reference", "before", "after"} <= set(gens[0])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_lorta_on_gqa_trains_and_counts_query_heads(tmp_path, alpaca_file):
    cfg = lm_cfg("alpaca", alpaca_file, method="lorta", steps=2)
    cfg.eval.generations = 0
    assert train(cfg, tmp_path / "run", progress=False) == 0
    s = RunDir(tmp_path / "run").read_summary()
    assert s["adapter_parameters"] == 4 * (32 + 8 + 4 + 2 + 4)  # r(d + d_H + H + L + 4), H = query heads


def test_dpo_run_reports_trl_metrics_and_caches_the_reference(tmp_path, dpo_file):
    cfg = lm_cfg("dpo", dpo_file, steps=8)
    cfg.train.batch_size = 4
    assert train(cfg, tmp_path / "run", progress=False) == 0
    run = RunDir(tmp_path / "run")
    s = run.read_summary()
    first = s["eval_initial"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 0
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/accuracies"] == 0.0
    assert s["eval_final"]["rewards/accuracies"] > first["rewards/accuracies"]
    assert s["eval_final"]["rewards/margins"] > 0 and s["eval_final"]["loss"] < math.log(2)
    train_records = [r for r in run.read_metrics() if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(train_records[0])
    ref = load_safetensors(run.path / REFERENCE_FILE)
    assert ref["train"].shape[1] == 2 and ref["eval"].shape[0] == s["data"]["eval"]
    assert s["reference"]["second_copy_bytes_avoided"] > 0 and s["reference"]["cached"]
    # the reference is the network with its adapter disabled: the cache equals the bare model's log-probs
    torch.manual_seed(cfg.train.seed)
    from esmfold_peft.nlp.train import task_for

    task = task_for(cfg, torch.device("cpu"))
    task.build()
    task.net.model.eval()
    with torch.no_grad():
        c, r = task._pair_logps(task.eval_rows[:3])
    assert torch.allclose(torch.stack([c, r], 1), ref["eval"][:3], atol=1e-5)


def test_dpo_without_cache_matches_cached_reference_at_start(tmp_path, dpo_file):
    cfg = lm_cfg("dpo", dpo_file, steps=1)
    cfg.dpo.precompute_reference = False
    cfg.train.batch_size = 4
    assert train(cfg, tmp_path / "run", progress=False) == 0
    s = RunDir(tmp_path / "run").read_summary()
    assert s["eval_initial"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert not (tmp_path / "run" / REFERENCE_FILE).exists()


def test_dpo_resume_reads_the_cached_reference(tmp_path, dpo_file):
    cfg = lm_cfg("dpo", dpo_file, steps=2, method="lorta")
    cfg.train.batch_size = 2
    assert train(cfg, tmp_path / "run", progress=False) == 0
    cached = load_safetensors(tmp_path / "run" / REFERENCE_FILE)
    resumed = config_for_resume(RunDir(tmp_path / "run").read_config(), ["train.steps=3"])
    assert train(resumed, tmp_path / "run", resume=True, progress=False) == 0
    again = load_safetensors(tmp_path / "run" / REFERENCE_FILE)
    assert all(torch.equal(cached[k], again[k]) for k in cached)


def test_head_only_is_refused_for_language_modelling(dpo_file):
    cfg = base_config()
    cfg.task, cfg.adapter.method = "dpo", "none"
    with pytest.raises(ConfigError, match="trains nothing"):
        resolve_defaults(cfg)


def test_response_logps_ignore_prompt_and_padding(alpaca_file):
    cfg = lm_cfg("alpaca", alpaca_file)
    torch.manual_seed(0)
    net = build_causal_lm(cfg)
    prepare_training(net, cfg)
    tok = net.tokenizer
    short = encode_turn(tok, [{"role": "user", "content": "A?"}], "Yes.", 256)
    long = encode_turn(tok, [{"role": "user", "content": "A much longer question?"}], "No, never.", 256)
    net.model.eval()
    with torch.no_grad():
        both, counts = response_logps(net.model, pad_batch([short, long], tok.pad_token_id, "cpu"))
        alone, _ = response_logps(net.model, pad_batch([short], tok.pad_token_id, "cpu"))
    assert counts.tolist() == [5, 11] and both[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
