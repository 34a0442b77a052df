"""Inference with a trained NLP run: its network rebuilt from RUN/config.json, its adapter (or trained
weights) restored, and then sentences labelled, prompts answered, or a plain Hugging Face folder written.

    loaded = load_run("runs/rt-lorta")                  # the run's network, adapter on (not merged)
    labels = classify(loaded, [("a fine film", None)])  # [{"label": "1", "index": 1, "probability": 0.93}]
    loaded = load_run("runs/alpaca-lora")
    answers = generate(loaded, [{"instruction": "Name a colour."}], max_new_tokens=32)
    export_hf(load_run("runs/rt-lorta"), "rt-lorta-hf")  # adapter merged: AutoModel*.from_pretrained reads it

The network is built as the run built it (`build_classifier` / `build_causal_lm` with the run's
config): a `random` base gets the same weights from the run's seed, a checkpoint folder is read
again. Then, by `adapter.method`: lorta/lora load RUN/adapter with `load_adapter` (which restores the
classification head saved beside it), none loads the head alone, full loads RUN/model's weights.
`adapter=False` leaves the adapter out (a full run: the base's weights) and keeps a trained head:
the base model, for comparison.

Generation is greedy and batched: the prompts of one batch are left-padded and answered in one
`model.generate` call, so each equals what the prompt gets alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import ml_collections as mlc
import torch

from ..adapters import has_adapters, is_adapted, load_adapter, unload
from ..adapters.files import HEAD_CONFIG, HEAD_WEIGHTS
from ..atomic import atomic_write
from ..runtime.artifacts import load_safetensors, read_json, require_file
from ..runtime.config import apply_overrides
from ..runtime.errors import ArtifactError, OutputPathError, UserError
from ..runtime.progress import Progress
from ..runtime.rundir import RunDir
from . import sources
from .config import LM_TASKS, config_for_resume
from .glue import TASKS, Example
from .instruct import messages_of, prompt_ids_for_generation
from .models import Network, build_causal_lm, build_classifier
from .tasks import ClassificationTask, load_head, pad_batch

# the classification tasks whose examples are sentence pairs (the stand-in corr2cause reads its own files)
PAIR_TASKS = frozenset(n for n, s in TASKS.items() if s.text_b is not None) | {"corr2cause"}
TSV_HEADERS = {1: ("sentence",), 2: ("sentence1", "sentence2")}  # a first line equal to these is a header
PathLike = Union[str, os.PathLike]


@dataclass
class LoadedRun:
    """A run's network, ready for inference (eval mode, on its device)."""

    path: Path
    cfg: mlc.ConfigDict
    net: Network
    labels: Optional[tuple]  # classification: the label names in index order (None: regression); LM: None
    adapter: bool  # whether the run's adapter is on the model (not merged)

    @property
    def is_lm(self) -> bool:
        return self.cfg.task in LM_TASKS

    @property
    def device(self) -> torch.device:
        return next(self.net.model.parameters()).device


# --- the run's network ----------------------------------------------------------------------------

def run_config(run_dir: PathLike, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """The run's stored config (keys added since it was written take their defaults), with `overrides`
    (e.g. `model.name=DIR` for a base checkpoint folder that moved)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run directory")
    if not run.config.is_file():
        raise ArtifactError(run.config, "no such file (is this a run directory of scripts/train_nlp.py?)")
    stored = run.read_config()
    task = stored.get("task")
    if not isinstance(task, str) or (task not in LM_TASKS and task not in TASKS):
        what = f"names the task {task!r}" if isinstance(task, str) else "names no task"
        raise ArtifactError(run.config, f"{what}: not the config of an NLP run (scripts/train_nlp.py writes those)")
    return apply_overrides(config_for_resume(stored, []), overrides)


def build_network(cfg: mlc.ConfigDict) -> Network:
    """The run's network before training, as the run built it (a `random` base from the run's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # what Task.setup seeds before building
        if cfg.task in LM_TASKS:
            return build_causal_lm(cfg)
        return build_classifier(cfg, TASKS[cfg.task].num_labels)


def load_run(run_dir: PathLike, adapter: bool = True, allow_other_base: bool = False, device="cpu",
             overrides: Sequence[str] = ()) -> LoadedRun:
    """The run's trained network (see the module docstring); every missing or damaged file is one line."""
    run = RunDir(run_dir)
    cfg = run_config(run.path, overrides)
    _check_exported(run, cfg)
    net = build_network(cfg)
    method = cfg.adapter.method
    if method == "full":
        _load_full(net, run.model_dir / "model.safetensors", head_only=not adapter)
    elif is_adapted(method) and adapter:
        load_adapter(net.model, run.adapter_dir, allow_other_base=allow_other_base)  # the head comes with it
    elif net.head_names:
        load_head(net.model, run.adapter_dir)
    net.model.to(device).eval()
    return LoadedRun(run.path, cfg, net, None if cfg.task in LM_TASKS else label_names(run, cfg),
                     adapter=has_adapters(net.model))


def _check_exported(run: RunDir, cfg: mlc.ConfigDict) -> None:
    """Refuse, in one line, a run that has not written what it trained (it stopped before its end)."""
    full = cfg.adapter.method == "full"
    folder = run.model_dir if full else run.adapter_dir
    if folder.is_dir():
        return
    status = run.status() or "unknown"
    raise ArtifactError(folder, f"no such folder: the run (status: {status}) has not written its trained "
                                f"{'model' if full else 'adapter'}; a run writes it when it ends "
                                f"(continue it: python scripts/train_nlp.py --out {run.path} --resume)")


def _load_full(net: Network, path: Path, head_only: bool) -> None:
    """A fully fine-tuned run's weights (RUN/model), strictly; `head_only`: just the classification head's."""
    if head_only and not net.head_names:
        return  # a language model's base: nothing of the run's to load
    state = load_safetensors(path)
    if head_only:
        state = {n: v for n, v in state.items() if n in set(net.head_names)}
    try:
        missing, unexpected = net.model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that differs
        raise ArtifactError(path, f"does not fit the run's network ({str(exc).splitlines()[-1].strip()})") from None
    if head_only:
        missing = [n for n in net.head_names if n not in state]
    if missing or unexpected:
        raise ArtifactError(path, f"does not fit the run's network (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")


def label_names(run: RunDir, cfg: mlc.ConfigDict) -> Optional[tuple]:
    """The class names in index order, as head_config.json records them (else the task's); None: regression."""
    path = run.adapter_dir / HEAD_CONFIG
    if path.is_file() and (run.adapter_dir / HEAD_WEIGHTS).is_file():
        labels = read_json(path, dict, "head config").get("labels", TASKS[cfg.task].labels)
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ArtifactError(path, f"key 'labels' should be a list of strings or null, found {labels!r}")
        if (1 if labels is None else len(labels)) != TASKS[cfg.task].num_labels:
            raise ArtifactError(path, f"names {labels!r} as the labels of task {cfg.task}, which has "
                                      f"{TASKS[cfg.task].num_labels} output(s)")
        return None if labels is None else tuple(labels)
    labels = TASKS[cfg.task].labels
    return None if labels is None else tuple(labels)


# --- a Hugging Face folder ----------------------------------------------------------------------------

def merged_model(loaded: LoadedRun) -> torch.nn.Module:
    """The plain transformers model: the adapter merged into the base weights and removed (in place)."""
    model = loaded.net.model
    if has_adapters(model):
        unload(model, merge=True)
        loaded.adapter = False
    if loaded.labels:
        model.config.id2label = {i: name for i, name in enumerate(loaded.labels)}
        model.config.label2id = {name: i for i, name in enumerate(loaded.labels)}
    return model


def export_hf(loaded: LoadedRun, out: PathLike, overwrite: bool = False) -> Path:
    """Write the run's network as a Hugging Face folder (`save_pretrained`: config, weights, tokenizer).

    AutoModelForSequenceClassification (classification, head included) or AutoModelForCausalLM reads
    it back with the run's outputs. Written into a temporary sibling folder renamed at the end.
    """
    model, tokenizer = merged_model(loaded), loaded.net.tokenizer

    def write(folder: Path) -> None:
        with sources.quiet_transformers():  # no "Writing model shards" bar
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        for path in folder.iterdir():  # transformers writes its weights 0600: a folder to share reads as any file
            path.chmod(0o666 & ~_umask())

    return write_folder_atomically(Path(out), write, overwrite)


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse (one line) an output folder that is a file, or that holds something unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputPathError(f"{out}: exists and is not empty; give a new --out, or --overwrite to replace it")


def write_folder_atomically(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """`write(tmp)` into a new sibling folder, then rename it to `out`; a failure leaves `out` as it was.

    An existing `out` must be an empty folder, or is replaced with `overwrite`.
    """
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    old = None
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- labelling sentences ----------------------------------------------------------------------------

def _text_lines(path: Path, what: str) -> list[str]:
    path = require_file(path, what)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ArtifactError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not any(line.strip() for line in lines):
        raise ArtifactError(path, f"empty file: no {'sentences' if what == 'sentence file' else 'prompts'}")
    return lines


def read_sentences(path: PathLike, columns: int) -> list[tuple[str, Optional[str]]]:
    """A TSV of one sentence (columns=1) or one sentence pair (2) a line; blank lines are skipped, and a
    first line `sentence` (`sentence1<TAB>sentence2`) is a header. Fields are not quoted (GLUE's style)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(_text_lines(path, "sentence file"), 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if n == 1 and tuple(c.strip().lower() for c in cells) == TSV_HEADERS[columns]:
            continue
        if len(cells) != columns:
            want = "one sentence" if columns == 1 else "two tab-separated sentences (a pair)"
            raise ArtifactError(path, f"line {n}: {len(cells)} tab-separated columns; this task takes {want} a line")
        if any(not c.strip() for c in cells):
            raise ArtifactError(path, f"line {n}: an empty sentence")
        rows.append((cells[0], cells[1] if columns == 2 else None))
    if not rows:
        raise ArtifactError(path, "no sentences (only a header)")
    return rows


def columns_of(cfg: mlc.ConfigDict) -> int:
    """How many sentences an example of the run's classification task has: 1, or 2 (pairs)."""
    return 2 if cfg.task in PAIR_TASKS else 1


@torch.no_grad()
def classify(loaded: LoadedRun, rows: Sequence[tuple[str, Optional[str]]], batch_size: int = 32,
             progress: bool = False) -> list[dict]:
    """Label (text_a, text_b) rows: {"label": name, "index", "probability"} each, or {"label": score} for
    a regression task. Encoded as the run encoded its examples (truncated to model.max_length)."""
    model, tok, device = loaded.net.model, loaded.net.tokenizer, loaded.device
    encoded = [ClassificationTask._encode(Example(a, b, 0), tok, loaded.cfg.model.max_length) for a, b in rows]
    out = []
    with Progress(len(encoded), "labelling", enabled=progress, unit="sentence") as bar:
        for lo in range(0, len(encoded), batch_size):
            chunk = encoded[lo:lo + batch_size]
            logits = model(**pad_batch(chunk, tok.pad_token_id or 0, device)).logits.float()
            out += _describe(logits, loaded.labels)
            bar.update(len(chunk))
    return out


def _describe(logits: torch.Tensor, labels: Optional[tuple]) -> list[dict]:
    if labels is None:
        return [{"label": float(v)} for v in logits[:, 0].tolist()]
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return [{"label": labels[i], "index": i, "probability": float(p)}
            for i, p in zip(best.tolist(), probs.gather(-1, best[:, None])[:, 0].tolist())]


def write_labels(path: PathLike, rows: Sequence[tuple[str, Optional[str]]], results: Sequence[dict],
                 columns: int) -> None:
    """A TSV with a header: the input column(s), `label`, and `probability` (not for regression)."""
    regression = bool(results) and "probability" not in results[0]
    header = list(TSV_HEADERS[columns]) + ["label"] + ([] if regression else ["probability"])
    lines = ["\t".join(header)]
    for (a, b), r in zip(rows, results):
        cells = [a] + ([b] if columns == 2 else [])
        cells += [f"{r['label']:.6g}"] if regression else [r["label"], f"{r['probability']:.6f}"]
        lines.append("\t".join(cells))
    text = "\n".join(lines) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- answering prompts --------------------------------------------------------------------------------

def read_prompts(path: PathLike) -> list[dict]:
    """JSON lines of {"instruction", "input"?, "system"?} or {"prompt", "system"?}; blank lines skipped."""
    path = Path(path)
    records = []
    for n, line in enumerate(_text_lines(path, "prompt file"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ArtifactError(path, f"line {n}: not valid JSON ({getattr(exc, 'msg', exc)} at column "
                                      f"{getattr(exc, 'colno', '?')})") from None
        fault = _prompt_fault(record)
        if fault:
            raise ArtifactError(path, f"line {n}: {fault}")
        records.append(record)
    return records


def _prompt_fault(record) -> Optional[str]:
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if ("prompt" in record) == ("instruction" in record):
        return "needs exactly one of the keys 'instruction' (with an optional 'input') and 'prompt'"
    for key in ("prompt", "instruction", "input", "system"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            return f"key {key!r} should be a string, found {type(record[key]).__name__}"
    if not (record.get("prompt") or record.get("instruction") or "").strip():
        return "an empty prompt"
    return None


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """The tokens a prompt record is answered after: the run's chat template or Alpaca template."""
    example = {"instruction": record.get("prompt") or record.get("instruction") or "",
               "input": record.get("input") or "", "system": record.get("system") or ""}
    return prompt_ids_for_generation(tokenizer, messages_of(example))


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, generated together in one `model.generate` call (the prompts
    left-padded): each one's new tokens up to its end-of-sequence token, as the prompt alone would get."""
    device = next(model.parameters()).device
    width, pad = max(len(p) for p in prompts), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad)
    stops = _stop_ids(model, tokenizer)
    rows = []
    for row in out[:, width:].tolist():  # a row that ended early is padded after its end token
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


def _stop_ids(model, tokenizer) -> set:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def generate(loaded: LoadedRun, records: Sequence[dict], max_new_tokens: int, batch_size: int = 8,
             progress: bool = False) -> list[str]:
    """Greedy answers to prompt records (see `read_prompts`), `batch_size` prompts per generate call."""
    model, tok = loaded.net.model, loaded.net.tokenizer
    ids = [prompt_ids(tok, r) for r in records]
    out = []
    with Progress(len(ids), "generating", enabled=progress, unit="prompt") as bar:
        for lo in range(0, len(ids), batch_size):
            batch = ids[lo:lo + batch_size]
            out += [tok.decode(row, skip_special_tokens=True).strip()
                    for row in generate_batch(model, tok, batch, max_new_tokens)]
            bar.update(len(batch))
    return out


def write_responses(path: PathLike, records: Iterable[dict], responses: Iterable[str]) -> None:
    """JSON lines: each input record with its `response`."""
    text = "".join(json.dumps({**r, "response": a}, ensure_ascii=False) + "\n" for r, a in zip(records, responses))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
