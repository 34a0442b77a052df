"""Direct preference optimisation (Rafailov et al. 2023) with the adapter-disabled network as reference.

    loss    = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
    rewards = β (log π(y|x) − log π_ref(y|x)),   log-probabilities summed over the response tokens

Reported as TRL's DPO trainer reports them (means over the pairs of a batch, or of the held-out
set): loss, rewards/chosen, rewards/rejected, rewards/margins (chosen − rejected) and
rewards/accuracies (share of pairs whose chosen reward is strictly above the rejected one; at step 0
the policy is the reference, every reward is 0 and the accuracy is 0), plus logps/chosen and
logps/rejected.

Reference policy: the same network with its adapter switched off (`AdapterSet.disabled()`): no
second copy of the weights in memory. Its log-probabilities are computed once before training and
cached in RUN/reference_logps.safetensors (`dpo.precompute_reference`; otherwise every step runs the
reference forward pass too). Full fine-tuning has no adapter to switch off: its reference is the
cache, computed before the first step.

Preference data formats (JSON list or JSON lines):

* prompt / chosen / rejected: strings, or message lists ({"role", "content"}, TRL's conversational form);
* HH-RLHF: chosen / rejected full transcripts ("\n\nHuman: … \n\nAssistant: …"); the prompt is the
  shared text up to the last "\n\nAssistant:";
* ShareGPT (LLaMA-Factory): conversations [{"from", "value"}] plus chosen / rejected messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..adapters import is_adapter_param
from ..runtime.artifacts import load_safetensors, save_safetensors
from ..runtime.errors import ArtifactError, ConfigError
from ..runtime.rundir import RunDir
from . import sources
from .instruct import encode_turn, read_json_records, response_logps, split_records
from .models import build_causal_lm
from .tasks import Task, pad_batch

log = logging.getLogger("esmfold_peft.nlp")

REFERENCE_FILE = "reference_logps.safetensors"
HH_ASSISTANT = "\n\nAssistant:"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "user", "function_call": "assistant"}


@dataclass(frozen=True)
class Pair:
    messages: tuple  # the conversation before the response, as ({"role", "content"}, …)
    chosen: str
    rejected: str
    raw_prompt: Optional[str] = None  # HH-RLHF: the transcript is the prompt, no template


# --- the DPO objective -----------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed response log-probabilities."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """TRL's names and definitions, as means over the pairs."""
    return {"loss": float(losses.detach().mean()),
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(policy_chosen.detach().mean()),
            "logps/rejected": float(policy_rejected.detach().mean())}


# --- reading ---------------------------------------------------------------------------------------

def _text(value, path: Path, n: int, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("value", value.get("content")), str):
        return value.get("value", value.get("content"))
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return _text(value[-1], path, n, what)
    raise ArtifactError(path, f"record {n}: {what} is neither text nor a message")


def _messages(turns, path: Path, n: int) -> tuple:
    out = []
    for t in turns:
        role = ROLES.get(t.get("from", t.get("role")))
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            raise ArtifactError(path, f"record {n}: a turn needs from/role and value/content, got {sorted(t)}")
        out.append({"role": role, "content": content})
    return tuple(out)


def parse_pair(record: dict, path: Path, n: int) -> Pair:
    if "chosen" not in record or "rejected" not in record:
        raise ArtifactError(path, f"record {n}: a preference pair needs 'chosen' and 'rejected' (has {sorted(record)})")
    if "conversations" in record:  # ShareGPT / LLaMA-Factory
        messages = _messages(record["conversations"], path, n)
        if record.get("system"):
            messages = ({"role": "system", "content": record["system"]},) + messages
        return Pair(messages, _text(record["chosen"], path, n, "chosen"), _text(record["rejected"], path, n, "rejected"))
    if "prompt" in record:
        prompt = record["prompt"]
        messages = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else _messages(prompt, path, n)
        return Pair(messages, _text(record["chosen"], path, n, "chosen"), _text(record["rejected"], path, n, "rejected"))
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF full transcripts
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise ArtifactError(path, f"record {n}: no prompt, and the texts have no '\\n\\nAssistant:' turn")
        prompt = chosen[:cut + len(HH_ASSISTANT)]
        if not rejected.startswith(prompt):
            prompt = _common_prompt(chosen, rejected)
        return Pair((), chosen[len(prompt):], rejected[len(prompt):], raw_prompt=prompt)
    raise ArtifactError(path, f"record {n}: unknown preference format (keys {sorted(record)})")


def _common_prompt(a: str, b: str) -> str:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    cut = a.rfind(HH_ASSISTANT, 0, k)
    return a[:cut + len(HH_ASSISTANT)] if cut >= 0 else a[:k]


def read_pairs(path: Path) -> list[Pair]:
    return [parse_pair(r, path, n) for n, r in enumerate(read_json_records(path))]


# --- the task ---------------------------------------------------------------------------------------

class PreferenceTask(Task):
    kind = "preference"
    primary = "rewards/accuracies"
    higher_is_better = True

    def build(self):
        from .glue import subset

        cfg = self.cfg
        if cfg.adapter.method == "full" and not cfg.dpo.precompute_reference:
            raise ConfigError("full fine-tuning has no adapter to switch off for the reference policy: "
                              "keep dpo.precompute_reference=true (the reference is then cached before step 1)")
        path = Path(cfg.data.path) if cfg.data.path else sources.dpo_demo_file(cfg.data.root or None)
        pairs = read_pairs(path)
        train, held = split_records(pairs, cfg.data.eval_fraction,
                                    lambda p: (p.raw_prompt or repr(p.messages)) + p.chosen)
        self.net = build_causal_lm(cfg)
        enc_train = [e for e in (self._encode(p) for p in train) if e is not None]
        enc_held = [e for e in (self._encode(p) for p in held) if e is not None]
        self.train_rows = subset(enc_train, cfg.data.max_train)
        self.eval_rows = subset(enc_held, cfg.data.max_eval)
        if not self.train_rows or not self.eval_rows:
            raise ArtifactError(path, f"no pairs fit model.max_length={cfg.model.max_length} "
                                      f"(train {len(self.train_rows)}, held out {len(self.eval_rows)})")
        self.train_size = len(self.train_rows)
        self.reference: dict[str, torch.Tensor] = {}
        self.counts = {"pairs": len(pairs), "train": len(self.train_rows), "eval": len(self.eval_rows),
                       "beta": cfg.dpo.beta}
        return self.net

    def _encode(self, pair: Pair):
        kw = dict(max_length=self.cfg.model.max_length, max_prompt_length=self.cfg.dpo.max_prompt_length,
                  raw_prompt=pair.raw_prompt)
        tok = self.net.tokenizer
        chosen = encode_turn(tok, list(pair.messages), pair.chosen, **kw)
        rejected = encode_turn(tok, list(pair.messages), pair.rejected, **kw)
        return None if chosen is None or rejected is None else (chosen, rejected)

    def data_summary(self) -> dict:
        return self.counts

    # --- log-probabilities ---------------------------------------------------------------------

    def _pair_logps(self, pairs: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [c for c, _ in pairs] + [r for _, r in pairs]  # one forward pass for both sides
        logps, _ = response_logps(self.net.model, pad_batch(rows, self.net.tokenizer.pad_token_id, self.device))
        return logps[:len(pairs)], logps[len(pairs):]

    @torch.no_grad()
    def _reference_logps(self, pairs: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.net.model
        was_training = model.training
        model.eval()
        try:
            aset = self.net.adapter_set
            if aset is not None:
                with aset.disabled():
                    return self._pair_logps(pairs)
            return self._pair_logps(pairs)  # full fine-tuning: only before the first step
        finally:
            model.train(was_training)

    def _compute_reference(self, rows: list) -> torch.Tensor:
        bs = max(1, self.cfg.eval.batch_size // 2)
        parts = [torch.stack(self._reference_logps(rows[lo:lo + bs]), 1) for lo in range(0, len(rows), bs)]
        return torch.cat(parts).cpu()  # (pairs, 2): chosen, rejected

    def before_training(self, run: RunDir, extra: dict) -> None:
        path = run.path / REFERENCE_FILE
        if not self.cfg.dpo.precompute_reference:
            return
        if path.is_file():
            self.reference = load_safetensors(path)
            want = {"train": len(self.train_rows), "eval": len(self.eval_rows)}
            if {k: v.shape[0] for k, v in self.reference.items()} == want:
                return
            log.warning("%s holds log-probabilities of other data; computing them again", path)
            if self.cfg.adapter.method == "full" and extra.get("val_initial") is not None:
                raise ArtifactError(path, "does not match the data, and full fine-tuning cannot recompute it")
        log.info("reference log-probabilities of %d + %d pairs (adapter disabled), cached in %s",
                 len(self.train_rows), len(self.eval_rows), path)
        self.reference = {"train": self._compute_reference(self.train_rows),
                          "eval": self._compute_reference(self.eval_rows)}
        save_safetensors(self.reference, path)

    def _reference_for(self, split: str, indices: Sequence[int], pairs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference:
            ref = self.reference[split][list(indices)].to(self.device)
            return ref[:, 0], ref[:, 1]
        return self._reference_logps(pairs)

    def loss(self, indices: Sequence[int]):
        pairs = [self.train_rows[i] for i in indices]
        ref_c, ref_r = self._reference_for("train", indices, pairs)
        pol_c, pol_r = self._pair_logps(pairs)
        losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.cfg.dpo.beta)
        return losses.mean(), dpo_metrics(losses, rc, rr, pol_c, pol_r)

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.net.model
        model.eval()
        bs = max(1, self.cfg.eval.batch_size // 2)
        parts = {k: [] for k in ("pc", "pr", "rc", "rr")}
        for lo in range(0, len(self.eval_rows), bs):
            idx = list(range(lo, min(lo + bs, len(self.eval_rows))))
            pairs = [self.eval_rows[i] for i in idx]
            if self.reference:
                rc, rr = self._reference_for("eval", idx, pairs)
            elif self.net.adapter_set is not None:
                rc, rr = self._reference_logps(pairs)
            pc, pr = self._pair_logps(pairs)
            for k, v in zip(("pc", "pr", "rc", "rr"), (pc, pr, rc, rr)):
                parts[k].append(v.cpu())
        pc, pr, rc, rr = (torch.cat(parts[k]) for k in ("pc", "pr", "rc", "rr"))
        losses, crew, rrew = dpo_loss(pc, pr, rc, rr, self.cfg.dpo.beta)
        return dpo_metrics(losses, crew, rrew, pc, pr)

    def after_training(self, run: RunDir, extra: dict) -> dict:
        base = [p for n, p in self.net.model.named_parameters() if not is_adapter_param(n)]
        avoided = sum(p.numel() * p.element_size() for p in base)
        return {"reference": {
            "policy": "the same network with its adapter disabled" if self.net.adapter_set is not None
            else "log-probabilities of the initial network, computed before the first step",
            "cached": bool(self.reference),
            "second_copy_bytes_avoided": avoided,
            "note": f"a separate reference model would hold another {avoided / 2**20:.1f} MiB of weights"}}
