"""The tasks of the harness behind one small base: what the training loop asks of a task.

A task builds its network and data (`setup`), gives the loss of a batch of training examples by
index (`loss`), scores the network on its held-out data (`evaluate`), and writes what it trained
(`export`). The loop in `train.py` knows nothing else about it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc
import torch
import torch.nn.functional as F

from ..adapters import save_adapter
from ..runtime.artifacts import save_safetensors
from ..runtime.rundir import RunDir
from .glue import compute_metrics, load_task
from .models import Network, build_classifier

log = logging.getLogger("esmfold_peft.nlp")
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"


class Task:
    kind = ""
    primary = ""  # the metric reported as the run's result
    higher_is_better = True

    def __init__(self, cfg: mlc.ConfigDict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.net: Optional[Network] = None
        self.train_size = 0

    def setup(self) -> Network:
        raise NotImplementedError

    def loss(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def before_training(self, run: RunDir, extra: dict) -> None:
        """Once per run, before the first step (and again, cheaply, on resume)."""

    def after_training(self, run: RunDir, extra: dict) -> dict:
        """After the last step: extra results for the summary."""
        return {}

    def data_summary(self) -> dict:
        return {}

    def export(self, run: RunDir) -> list[Path]:
        """Write the trained adapter (the core's format) and anything trained beside it; the paths written."""
        written = []
        model = self.net.model
        if self.cfg.adapter.method in ("lorta", "lora"):
            written.append(save_adapter(model, run.adapter_dir))
        if self.cfg.adapter.method == "full":
            run.model_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors({k: v for k, v in model.state_dict().items()}, run.model_dir / "model.safetensors")
            model.config.save_pretrained(str(run.model_dir))
            self.net.tokenizer.save_pretrained(str(run.model_dir))
            written.append(run.model_dir)
        return written


def pad_batch(rows: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest row; attention_mask marks real tokens."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
        out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    out["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                          for r in rows], dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


# --- classification ------------------------------------------------------------------------------

class ClassificationTask(Task):
    """GLUE-style sentence (pair) classification or regression with an encoder and a trained head."""

    kind = "classification"

    def setup(self) -> Network:
        self.spec, train, evals = load_task(self.cfg)
        self.primary = self.spec.primary
        self.net = build_classifier(self.cfg, self.spec.num_labels)
        tok, n = self.net.tokenizer, self.cfg.model.max_length
        self.train_rows = [self._encode(e, tok, n) for e in train]
        self.train_labels = [e.label for e in train]
        self.eval_sets = {name: ([self._encode(e, tok, n) for e in ex], [e.label for e in ex])
                          for name, ex in evals.items()}
        self.train_size = len(train)
        self.counts = {"train": len(train), **{f"eval_{k}": len(v) for k, v in evals.items()}}
        return self.net

    @staticmethod
    def _encode(example, tok, max_length: int) -> dict:
        enc = tok(example.text_a, example.text_b, truncation=True, max_length=max_length)
        keep = ("input_ids", "token_type_ids")
        return {k: list(v) for k, v in enc.items() if k in keep}

    def data_summary(self) -> dict:
        return {"examples": self.counts, "labels": list(self.spec.labels) if self.spec.labels else "score",
                "metrics": list(self.spec.metrics)}

    def _forward(self, rows: list[dict]) -> torch.Tensor:
        batch = pad_batch(rows, self.net.tokenizer.pad_token_id or 0, self.device)
        return self.net.model(**batch).logits

    def _targets(self, labels: list) -> torch.Tensor:
        if self.spec.labels is None:
            return torch.tensor(labels, dtype=torch.float32, device=self.device)
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def loss(self, indices):
        logits = self._forward([self.train_rows[i] for i in indices])
        target = self._targets([self.train_labels[i] for i in indices])
        if self.spec.labels is None:
            loss = F.mse_loss(logits.squeeze(-1).float(), target)
        else:
            loss = F.cross_entropy(logits.float(), target)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, rows: list[dict]) -> list:
        model = self.net.model
        was_training = model.training
        model.eval()
        out = []
        bs = self.cfg.eval.batch_size
        try:
            for lo in range(0, len(rows), bs):
                logits = self._forward(rows[lo:lo + bs]).float()
                out += (logits.squeeze(-1) if self.spec.labels is None else logits.argmax(-1)).tolist()
        finally:
            model.train(was_training)
        return out

    def evaluate(self) -> dict:
        results = {}
        for name, (rows, labels) in self.eval_sets.items():
            metrics = compute_metrics(self.spec, self.predict(rows), labels)
            prefix = "" if name in ("dev", "matched") else f"{name}_"
            results.update({f"{prefix}{k}": v for k, v in metrics.items()})
        return results

    def export(self, run: RunDir) -> list[Path]:
        written = super().export(run)
        if self.cfg.adapter.method != "full":  # with full fine-tuning the head is inside model/
            params = dict(self.net.model.named_parameters())
            run.adapter_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors({n: params[n] for n in self.net.head_names}, run.adapter_dir / HEAD_WEIGHTS)
            meta = {"task": self.spec.name, "labels": list(self.spec.labels) if self.spec.labels else None,
                    "num_labels": self.spec.num_labels, "model": self.cfg.model.name,
                    "parameters": {n: list(params[n].shape) for n in self.net.head_names}}
            (run.adapter_dir / HEAD_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
            written.append(run.adapter_dir / HEAD_WEIGHTS)
        return written


def load_head(model, directory: Path) -> None:
    """Load a head saved by `ClassificationTask.export` into a classification model (strict)."""
    from ..runtime.artifacts import load_safetensors
    from ..runtime.errors import ArtifactError

    tensors = load_safetensors(Path(directory) / HEAD_WEIGHTS)
    params = dict(model.named_parameters())
    bad = [n for n, v in tensors.items() if n not in params or params[n].shape != v.shape]
    if bad:
        raise ArtifactError(Path(directory) / HEAD_WEIGHTS, f"does not fit this model: {bad[:4]}")
    with torch.no_grad():
        for n, v in tensors.items():
            params[n].copy_(v)


def task_for(cfg: mlc.ConfigDict, device: torch.device) -> Task:
    from .glue import TASKS
    from .instruct import InstructionTask
    from .preference import PreferenceTask

    if cfg.task == "alpaca":
        return InstructionTask(cfg, device)
    if cfg.task == "dpo":
        return PreferenceTask(cfg, device)
    if cfg.task in TASKS:
        return ClassificationTask(cfg, device)
    from ..runtime.errors import ConfigError

    raise ConfigError(f"unknown task {cfg.task!r}; known: {', '.join(list(TASKS) + ['alpaca', 'dpo'])}")
