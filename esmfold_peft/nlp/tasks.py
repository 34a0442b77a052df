"""The tasks of the harness behind one small base: what the run loop asks of an NLP task.

`Task` is the NLP side of `runtime.loop.TrainingTask`, written once for every task: the network and
what trains in it, AdamW with the paper's separate head rate, the linear/cosine schedule, micro-
batches, the divergence rule, checkpoints of the trained tensors, the summary and the curves. A
task adds its data and network (`build`), the loss of a batch of training examples by index
(`loss`), its held-out scores (`evaluate`) and what it writes (`export`).

Exact resume: the examples of step s are a pure function of (seed, s) (a seeded permutation per
epoch), dropout is seeded per step from (seed, s), and the learning rate is a function of s; the
checkpoint holds the trained parameters, the optimizer state and the step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import ml_collections as mlc
import torch
import torch.nn.functional as F

from ..adapters import is_adapted, save_adapter
from ..adapters.files import HEAD_WEIGHTS
from ..adapters.head import check_head, copy_head, read_head, save_head
from ..runtime.artifacts import save_safetensors, torch_load, torch_save
from ..runtime.errors import ArtifactError
from ..runtime.loop import Context, Schedule, StepResult, TrainingTask
from ..runtime.rundir import RunDir
from ..runtime.session import step_seed
from ..runtime.text import finite_or_none
from .glue import compute_metrics, load_task
from .models import Network, build_classifier, describe_layout, load_trainable_state, prepare_training, \
    trainable_state
from .plots import plot_curves

log = logging.getLogger("esmfold_peft.nlp")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step `step`: consecutive slices of a fresh permutation per epoch."""
    out, cache = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            g = torch.Generator().manual_seed(step_seed(seed, epoch, "epoch"))
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos % n])
    return out


def lr_factor(cfg: mlc.ConfigDict, step: int) -> float:
    o, total = cfg.optim, cfg.train.steps
    warmup = int(round(o.warmup_ratio * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class Task(TrainingTask):
    application = "nlp"
    metrics_key = "eval"
    kind = ""
    primary = ""  # the metric reported as the run's result, and the one that selects the best model
    higher_is_better = True

    def __init__(self, cfg: mlc.ConfigDict, device: Optional[torch.device] = None):
        super().__init__(cfg)
        self.device = device
        self.net: Optional[Network] = None
        self.train_size = 0

    # --- what a task adds ------------------------------------------------------------------------

    def build(self) -> Network:
        """Read the data and build the network (self.net)."""
        raise NotImplementedError

    def loss(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def data_summary(self) -> dict:
        return {}

    # --- the loop's interface ----------------------------------------------------------------------

    @property
    def monitor(self) -> str:
        return self.primary

    def schedule(self) -> Schedule:
        return Schedule.of(self.cfg.train, self.cfg.train.eval_every)

    def description(self) -> str:
        return f"{self.cfg.task} {self.cfg.adapter.method}"

    def model(self):
        return self.net.model if self.net is not None else None

    def prepare(self, run: RunDir, resume: bool) -> dict:
        return self.cfg.to_dict()

    def setup(self, ctx: Context, checkpoint: Optional[Path]):
        cfg = self.cfg
        self.device = ctx.device
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed)  # the head's initialisation and the adapter's
        net = self.build()
        self.param_counts = prepare_training(net, cfg)
        net.model.to(self.device)
        self.optimizer = self._optimizer()
        self.params = [p for p in net.model.parameters() if p.requires_grad]
        restored = None
        if checkpoint is not None:
            ckpt = torch_load(checkpoint)
            load_trainable_state(net.model, ckpt["trainable"], str(checkpoint))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            extra = dict(ckpt["extra"])
            if "eval_initial" in extra:  # checkpoints written before the shared loop
                extra["val_initial"] = extra.pop("eval_initial")
            restored = int(ckpt["step"]), extra
        log.info("task %s on %s: %s", cfg.task, net.description, self.data_summary())
        log.info("trainable parameters: %s", self.param_counts)
        return restored

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, heads = self.cfg, set(self.net.head_names)
        body, head = [], []
        for name, p in self.net.model.named_parameters():
            if p.requires_grad:
                (head if name in heads else body).append(p)
        groups = [g for g in ({"params": body, "lr": cfg.optim.lr, "base_lr": cfg.optim.lr},
                              {"params": head, "lr": cfg.optim.head_lr, "base_lr": cfg.optim.head_lr}) if g["params"]]
        return torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                 weight_decay=cfg.optim.weight_decay)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over the step's examples in micro-batches; a non-finite or too large loss or
        gradient norm is a divergence (no update)."""
        cfg, optimizer = self.cfg, self.optimizer
        factor = lr_factor(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.net.model.train()
        torch.manual_seed(step_seed(cfg.train.seed, step, "dropout"))
        indices = batch_indices(self.train_size, cfg.train.batch_size, cfg.train.seed, step)
        micro = cfg.train.micro_batch_size or cfg.train.batch_size
        optimizer.zero_grad(set_to_none=True)
        sums: dict = {}
        for part in (indices[i:i + micro] for i in range(0, len(indices), micro)):
            loss, terms = self.loss(part)
            value = float(loss.detach())
            if not math.isfinite(value):
                return StepResult(sums or terms, divergence=f"non-finite loss ({value})")
            if value > cfg.train.diverge_loss_threshold:
                return StepResult(sums or terms, divergence=f"loss {value:.4g} above train.diverge_loss_threshold="
                                                            f"{cfg.train.diverge_loss_threshold}")
            (loss * len(part) / len(indices)).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(part) / len(indices)
        grad_norm = None
        if cfg.optim.clip_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.clip_grad_norm))
            if not math.isfinite(grad_norm):
                return StepResult(sums, grad_norm, divergence=f"non-finite gradient norm ({grad_norm})")
        optimizer.step()
        return StepResult(sums, grad_norm, scalars={"lr": optimizer.param_groups[0]["lr"]})

    def validate(self) -> dict:
        return self.evaluate()

    def save(self, path: Path, step: int, extra: dict) -> None:
        torch_save({"step": step, "trainable": trainable_state(self.net.model), "optimizer": self.optimizer.state_dict(),
                    "extra": extra, "config": self.cfg.to_dict()}, path)

    def load_weights(self, path: Path) -> None:
        load_trainable_state(self.net.model, torch_load(path)["trainable"], str(path))

    def results(self, initial: Optional[dict], final: Optional[dict]) -> dict:
        cfg, net, adapted = self.cfg, self.net, is_adapted(self.cfg)
        counts = getattr(self, "param_counts", {})
        return {"task": cfg.task, "adapter": cfg.adapter.method, "rank": cfg.adapter.rank if adapted else None,
                "alpha": cfg.adapter.alpha if adapted else None,
                "model": net.description if net else None, "config": cfg.name, "parameters": counts,
                "adapter_parameters": counts.get("adapter"), "layout": describe_layout(net) if net else None,
                "device": str(self.device), "data": self.data_summary() if net else {},
                "primary_metric": self.primary, "eval_initial": initial or {}, "eval_final": final,
                "primary_initial": finite_or_none((initial or {}).get(self.primary)),
                "primary_final": finite_or_none((final or {}).get(self.primary))}

    def plot(self, run: RunDir) -> None:
        plot_curves(run.path, self.primary)

    def export(self, run: RunDir) -> list[Path]:
        """Write the trained adapter (the core's format) and anything trained beside it; the paths written."""
        written = []
        model = self.net.model
        if is_adapted(self.cfg):
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

    def build(self) -> Network:
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
            meta = {"task": self.spec.name, "labels": list(self.spec.labels) if self.spec.labels else None,
                    "num_labels": self.spec.num_labels, "model": self.cfg.model.name}
            written.append(save_head({n: params[n] for n in self.net.head_names}, run.adapter_dir, meta))
        return written


def load_head(model, directory: Path) -> None:
    """Load a head saved by `ClassificationTask.export` into a classification model (strict).

    `adapters.load_adapter` restores it with the adapter already; this loads the head alone.
    """
    path = Path(directory) / HEAD_WEIGHTS
    if not path.exists():
        raise ArtifactError(path, "no classification head saved here")
    tensors = read_head(Path(directory))
    check_head(model, tensors, path)
    copy_head(model, tensors)
