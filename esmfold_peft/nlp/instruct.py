"""Instruction tuning of a causal LM: Alpaca-format data, loss on response tokens only.

Data: a JSON list (or JSON lines) of {"instruction", "input", "output"} records (Stanford Alpaca's
format; an optional "system" is kept). Prompts are written with the model's chat template when its
tokenizer has one, else with the Alpaca template. Only the response tokens (and the end-of-turn or
end-of-sequence token that closes them) carry loss; prompt and padding tokens are masked.

Evaluation: held-out response loss (nats per response token, token-weighted over the whole set) and
its perplexity, plus greedy answers to a few held-out prompts before and after training, written to
RUN/generations.jsonl. MT-Bench, the paper's benchmark, needs a judge model (GPT-4 in the paper) and
is not run here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..runtime.errors import ArtifactError
from ..runtime.rundir import RunDir
from . import sources
from .glue import _hash_fraction
from .models import build_causal_lm
from .tasks import Task, pad_batch

log = logging.getLogger("esmfold_peft.nlp")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
GENERATIONS = "generations.jsonl"


# --- reading ------------------------------------------------------------------------------------

def read_json_records(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines of objects."""
    if not path.is_file():
        raise ArtifactError(path, "no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise ArtifactError(path, f"neither a JSON list nor JSON lines ({exc})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ArtifactError(path, "expected a non-empty list of JSON objects")
    return data


def read_alpaca(path: Path) -> list[dict]:
    records = read_json_records(path)
    out = []
    for n, r in enumerate(records):
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ArtifactError(path, f"record {n}: an Alpaca record needs string 'instruction' and 'output' "
                                      f"(has {sorted(r)})")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"],
                    "system": r.get("system") or ""})
    return out


# --- prompts ---------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def user_message(example: dict) -> str:
    return example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")


def encode_turn(tokenizer, messages: list[dict], response: str, max_length: int,
                max_prompt_length: Optional[int] = None, raw_prompt: Optional[str] = None) -> Optional[dict]:
    """Token ids of prompt + response with labels on the response only; None when nothing of it fits.

    `messages` are the conversation before the response ({"role", "content"}). With a chat template
    the response keeps the template's end-of-turn marker; otherwise the prompt is `raw_prompt` (or
    the Alpaca template of the last user message) and the response ends with EOS. A prompt longer
    than `max_prompt_length` keeps its end.
    """
    if has_chat_template(tokenizer) and raw_prompt is None:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        tail = full[len(prompt):] if full.startswith(prompt) else response
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    else:
        if raw_prompt is None:
            users = [m["content"] for m in messages if m["role"] == "user"]
            raw_prompt = alpaca_prompt(users[-1] if users else "")
        prompt_ids = tokenizer(raw_prompt)["input_ids"]  # with the tokenizer's BOS, if it adds one
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_prompt_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    response_ids = response_ids[:room]
    return {"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids}


def prompt_ids_for_generation(tokenizer, messages: list[dict]) -> list[int]:
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return tokenizer(alpaca_prompt(users[-1] if users else ""))["input_ids"]


def messages_of(example: dict) -> list[dict]:
    system = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    return system + [{"role": "user", "content": user_message(example)}]


# --- log-probabilities ------------------------------------------------------------------------------

def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p of the response tokens, number of response tokens), one value per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return (token_logps * mask).sum(-1), mask.sum(-1)


def split_records(records: list, eval_fraction: float, key) -> tuple[list, list]:
    train, held = [], []
    for r in records:
        (held if _hash_fraction(key(r)) < eval_fraction else train).append(r)
    return train, held


# --- the task ----------------------------------------------------------------------------------------

class InstructionTask(Task):
    kind = "instruction"
    primary = "response_loss"
    higher_is_better = False

    def build(self):
        from .glue import subset

        cfg = self.cfg
        path = Path(cfg.data.path) if cfg.data.path else sources.alpaca_demo_file(cfg.data.root or None)
        records = read_alpaca(path)
        train, held = split_records(records, cfg.data.eval_fraction, lambda r: r["instruction"] + r["input"])
        self.net = build_causal_lm(cfg)
        tok = self.net.tokenizer
        self.template = "chat template" if has_chat_template(tok) else "Alpaca template"
        train_rows = self._encode_all(train)
        eval_rows = self._encode_all(held)
        self.train_rows, kept_train = [r for r, _ in train_rows], len(train_rows)
        self.eval_rows = [r for r, _ in subset(eval_rows, cfg.data.max_eval)]
        self.eval_examples = [e for _, e in subset(eval_rows, cfg.data.max_eval)]
        self.train_rows = [r for r in subset(self.train_rows, cfg.data.max_train)]
        if not self.train_rows or not self.eval_rows:
            raise ArtifactError(path, f"no examples fit model.max_length={cfg.model.max_length} "
                                      f"(train {len(self.train_rows)}, held out {len(self.eval_rows)})")
        self.train_size = len(self.train_rows)
        self.counts = {"records": len(records), "train_fitting": kept_train, "train": len(self.train_rows),
                       "eval": len(self.eval_rows), "template": self.template,
                       "response_tokens_eval": sum(sum(1 for t in r["labels"] if t != -100) for r in self.eval_rows)}
        return self.net

    def _encode_all(self, examples: list[dict]) -> list[tuple[dict, dict]]:
        out = []
        for ex in examples:
            row = encode_turn(self.net.tokenizer, messages_of(ex), ex["output"], self.cfg.model.max_length)
            if row is not None:
                out.append((row, ex))
        return out

    def data_summary(self) -> dict:
        return self.counts

    def _batch(self, rows):
        return pad_batch(rows, self.net.tokenizer.pad_token_id, self.device)

    def loss(self, indices: Sequence[int]):
        logps, counts = response_logps(self.net.model, self._batch([self.train_rows[i] for i in indices]))
        loss = -logps.sum() / counts.sum().clamp(min=1)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.net.model
        model.eval()
        total, tokens = 0.0, 0
        bs = self.cfg.eval.batch_size
        for lo in range(0, len(self.eval_rows), bs):
            logps, counts = response_logps(model, self._batch(self.eval_rows[lo:lo + bs]))
            total -= float(logps.sum())
            tokens += int(counts.sum())
        loss = total / max(1, tokens)
        return {"response_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "response_tokens": tokens}

    @torch.no_grad()
    def generate(self) -> list[str]:
        model, tok = self.net.model, self.net.tokenizer
        model.eval()
        out = []
        for ex in self.eval_examples[:self.cfg.eval.generations]:
            ids = torch.tensor([prompt_ids_for_generation(tok, messages_of(ex))], device=self.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=self.cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out

    def before_training(self, run: RunDir, extra: dict) -> None:
        if self.cfg.eval.generations and "generations_before" not in extra:
            extra["generations_before"] = self.generate()

    def after_training(self, run: RunDir, extra: dict) -> dict:
        if not self.cfg.eval.generations:
            return {}
        after = self.generate()
        before = extra.get("generations_before") or [None] * len(after)
        lines = [json.dumps({"instruction": ex["instruction"], "input": ex["input"], "reference": ex["output"],
                             "before": b, "after": a}, ensure_ascii=False)
                 for ex, b, a in zip(self.eval_examples, before, after)]
        (run.path / GENERATIONS).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {"generations": str(run.path / GENERATIONS),
                "note": "MT-Bench (the paper's benchmark) needs a judge model and is not run"}
