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

Several runs over one base (`load_runs`): the base network is built once, from the first run, and
each run's adapter is loaded onto it under its own name and made available to mixed batches
(`AdapterSet.mix`, `adapters/mixed.py`). `classify` and `generate` then take one adapter name per
row (None: the base model), and the rows of one batch may name different adapters: the batch runs
once, inside `AdapterSet.routed`, each row with its own adapter, and each row's result equals what
it gets with its run alone (`load_run`; a None row: `load_run(first run, adapter=False)`).

    runs = load_runs(["runs/rt-a", "runs/rt-b"])        # adapter names: the folder names
    classify(runs, [("a fine film", None)] * 3, adapters=["rt-a", "rt-b", None])
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import ml_collections as mlc
import torch

from ..adapters import get_adapter_set, has_adapters, is_adapted, load_adapter, unload
from ..adapters.files import HEAD_CONFIG, HEAD_WEIGHTS
from ..adapters.head import check_head, copy_head, read_head
from ..adapters.io import saved_base
from ..adapters.mixed import MixedAdapterError
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
ADAPTER_KEY = "adapter"  # an input's adapter: a TSV header's extra last column, a JSON line's key
PathLike = Union[str, os.PathLike]


class _Served:
    """What a loaded run and several runs over one network share (they have `cfg` and `net`)."""

    @property
    def is_lm(self) -> bool:
        return self.cfg.task in LM_TASKS

    @property
    def device(self) -> torch.device:
        return next(self.net.model.parameters()).device


@dataclass
class LoadedRun(_Served):
    """A run's network, ready for inference (eval mode, on its device)."""

    path: Path
    cfg: mlc.ConfigDict
    net: Network
    labels: Optional[tuple]  # classification: the label names in index order (None: regression); LM: None
    adapter: bool  # whether the run's adapter is on the model (not merged)


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


# --- several runs over one base -------------------------------------------------------------------------

BASE = "base"  # the base model's name in input files and on the command line (None in the API)


@dataclass
class MixedRun:
    """One run of a `LoadedRuns`: its folder, its config, its label names and its classification head."""

    path: Path
    cfg: mlc.ConfigDict
    labels: Optional[tuple]
    head: dict  # the head's leaf module path -> {parameter name: tensor}; {} for a language model


@dataclass
class LoadedRuns(_Served):
    """Several runs' adapters over one base network (`load_runs`), ready for mixed batches (eval mode).

    The model holds the first run's head; in a routed batch each row meets its own run's head."""

    net: Network
    runs: dict  # adapter name -> MixedRun, in the order given

    @property
    def names(self) -> tuple:
        return tuple(self.runs)

    @property
    def first(self) -> MixedRun:
        return next(iter(self.runs.values()))

    @property
    def cfg(self) -> mlc.ConfigDict:
        return self.first.cfg

    @property
    def labels(self) -> Optional[tuple]:
        """The first run's label names (a base row's); each run has its own (`run_of(name).labels`)."""
        return self.first.labels


    def run_of(self, name: Optional[str]) -> MixedRun:
        """The run whose head and settings a row with adapter `name` uses (None, the base model: the first's)."""
        return self.first if name is None else self.runs[name]


AnyLoaded = Union[LoadedRun, LoadedRuns]


def run_names(run_dirs: Sequence[PathLike], names: Optional[Sequence[Optional[str]]] = None) -> list[str]:
    """The adapter names of runs served together: `names[i]`, else the folder's name; checked (one line)."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("no runs given")
    given = list(names) if names is not None else [None] * len(dirs)
    if len(given) != len(dirs):
        raise ValueError(f"{len(given)} names for {len(dirs)} runs")
    out = [n if n is not None else Path(os.path.abspath(d)).name for d, n in zip(dirs, given)]
    for d, n in zip(dirs, out):
        if not n or "." in n or n == BASE:
            raise UserError(f"{d}: {n!r} cannot name its adapter (a name is not empty, has no '.', and {BASE!r} "
                            "is the base model): give it another (--run NAME=DIR)")
        if out.count(n) > 1:
            twins = ", ".join(str(x) for x, m in zip(dirs, out) if m == n)
            raise UserError(f"{out.count(n)} runs are named {n!r} ({twins}): give them names (--run NAME=DIR)")
    return out


def load_runs(run_dirs: Sequence[PathLike], names: Optional[Sequence[Optional[str]]] = None,
              allow_other_base: bool = False, device="cpu", overrides: Sequence[str] = ()) -> LoadedRuns:
    """Several runs' adapters over ONE base network, for batches whose rows use different adapters.

    The runs must share the base: the same kind of task (classification with the same input columns and
    number of outputs, or language modelling), the same `model.name` (a `random` one also the same
    `model.random`, `model.max_length` and seed, which make its weights), and the same base weights: the
    fingerprints their adapters recorded agree, and `load_adapter` checks each against the network built
    from the first run. Each must be a lorta or lora run (none and full runs have no adapter to route),
    all of one kind (the core stacks one kind per model). Adapter names default to the folders' names.

    Classification heads: each run trained its own. The model holds the first run's; the others' tensors
    are kept per leaf module of the head (BERT: `bert.pooler.dense` and `classifier`; RoBERTa:
    `classifier.dense` and `classifier.out_proj`). In a routed batch (`classify(..., adapters=...)`) a
    forward hook on each of these modules recomputes its output for the rows of every other run with
    `torch.func.functional_call` and that run's tensors. So the encoder runs once per batch, each row with
    its own adapter, and each row then meets its own run's head: the same code and weights as with its
    run alone (the head's modules treat rows independently), hence the same logits up to float
    reassociation. A base row (None) keeps the first run's head, as `load_run(first, adapter=False)`.
    """
    dirs = [Path(d) for d in run_dirs]
    names = run_names(dirs, names)
    cfgs = [run_config(d, overrides) for d in dirs]
    for d, cfg in zip(dirs, cfgs):
        _check_mixable(RunDir(d), cfg)
    _check_one_base(dirs, cfgs, allow_other_base)
    net = build_network(cfgs[0])
    runs = {name: _add_run(net, RunDir(d), name, cfg, allow_other_base) for d, name, cfg in zip(dirs, names, cfgs)}
    net.model.to(device).eval()
    params = dict(net.model.named_parameters())
    for run in runs.values():  # the heads' tensors where and as the model's
        run.head = {m: {k: v.to(params[f"{m}.{k}"]) for k, v in leaf.items()} for m, leaf in run.head.items()}
    copy_head(net.model, {f"{m}.{k}": v for m, leaf in next(iter(runs.values())).head.items() for k, v in leaf.items()})
    return LoadedRuns(net, runs)


def _check_mixable(run: RunDir, cfg: mlc.ConfigDict) -> None:
    method = cfg.adapter.method
    if not is_adapted(method):
        what = {"none": "a head-only run", "full": "a fully fine-tuned run"}.get(method, f"a {method} run")
        raise UserError(f"{run.path}: {what} (adapter.method={method}) has no adapter to serve beside others' "
                        "over one network; predict with it alone")
    _check_exported(run, cfg)


def _check_one_base(dirs: Sequence[Path], cfgs: Sequence[mlc.ConfigDict], allow_other_base: bool) -> None:
    """Refuse (one line) runs that do not share one base network, or adapters of two kinds."""
    for d, cfg in zip(dirs[1:], cfgs[1:]):
        fault = _base_difference(cfgs[0], cfg)
        if fault:
            raise UserError(f"{d} cannot share one network with {dirs[0]}: {fault}")
    if len({cfg.adapter.method for cfg in cfgs}) > 1:
        kinds = ", ".join(f"{d} ({cfg.adapter.method})" for d, cfg in zip(dirs, cfgs))
        raise UserError(f"LoRTA and LoRA adapters cannot share one mixed batch: {kinds}; predict with each kind "
                        "separately")
    prints = [_fingerprint(RunDir(d)) for d in dirs]
    for d, digest in zip(dirs[1:], prints[1:]):
        if not allow_other_base and digest and prints[0] and digest != prints[0]:
            raise UserError(f"{d}: its adapter was made for other base weights (sha256 {digest[:12]}…) than "
                            f"{dirs[0]}'s ({prints[0][:12]}…); runs served together share one base")


def _base_difference(a: mlc.ConfigDict, b: mlc.ConfigDict) -> Optional[str]:
    """What keeps run config `b` off the network built from run config `a` (None: nothing)."""
    if (a.task in LM_TASKS) != (b.task in LM_TASKS):
        return f"task {b.task} vs {a.task} (a language model and a classifier)"
    shape = [None if c.task in LM_TASKS else (columns_of(c), TASKS[c.task].num_labels) for c in (a, b)]
    if shape[0] != shape[1]:
        return f"task {b.task} vs {a.task} (other inputs or outputs)"
    keys = ["model.name"]
    if a.model.name == "random":  # its weights come from these and the seed
        keys += [f"model.random.{k}" for k in sorted(set(a.model.random) | set(b.model.random))]
        keys += ["model.max_length", "train.seed"]
    for key in keys:
        mine, theirs = (_get(c, key) for c in (a, b))
        if mine != theirs:
            return f"{key} {theirs} vs {mine}" + (" (the seed makes a random network's weights)"
                                                   if key == "train.seed" else "")
    return None


def _get(cfg: mlc.ConfigDict, key: str):
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, mlc.ConfigDict) else None
    return cfg


def _fingerprint(run: RunDir) -> Optional[str]:
    """The float32 fingerprint of the base weights the run's adapter records (None: none recorded)."""
    base = saved_base(run.adapter_dir) or {}
    return (base.get("sha256") or {}).get("float32")


def _add_run(net: Network, run: RunDir, name: str, cfg: mlc.ConfigDict, allow_other_base: bool) -> MixedRun:
    """Load a run's adapter under `name`, make it routable, and read its head (not copied into the model)."""
    load_adapter(net.model, run.adapter_dir, name=name, allow_other_base=allow_other_base, head=False,
                 activate=False)
    try:
        get_adapter_set(net.model).mix(name)
    except MixedAdapterError as exc:
        raise UserError(f"{run.path}: its adapter cannot be served beside others: {exc}") from None
    head = _run_head(net, run) if net.head_names else {}
    return MixedRun(run.path, cfg, None if cfg.task in LM_TASKS else label_names(run, cfg), head)


def _run_head(net: Network, run: RunDir) -> dict:
    """The run's trained head, checked against the model and grouped by leaf module."""
    path = run.adapter_dir / HEAD_WEIGHTS
    tensors = read_head(run.adapter_dir)
    if set(tensors) != set(net.head_names):
        raise ArtifactError(path, "no classification head saved here" if not tensors else
                            f"holds {', '.join(sorted(tensors)[:4])}, not the model's head "
                            f"({', '.join(sorted(net.head_names)[:4])})")
    check_head(net.model, tensors, path)
    leaves: dict = {}
    for n, v in tensors.items():
        module, _, leaf = n.rpartition(".")
        leaves.setdefault(module, {})[leaf] = v
    return leaves


def _row_adapters(loaded: AnyLoaded, n: int, adapters: Optional[Sequence[Optional[str]]]) -> Optional[list]:
    """Per row: its adapter's name (None, or "base": the base model), checked; None for one run's `LoadedRun`."""
    if isinstance(loaded, LoadedRun):
        if adapters is not None:
            raise ValueError("per-row adapters need the runs loaded together: load_runs, not load_run")
        return None
    names = [loaded.names[0]] * n if adapters is None else [None if a == BASE else a for a in adapters]
    if len(names) != n:
        raise ValueError(f"{len(names)} adapter names for {n} rows")
    for i, name in enumerate(names):
        if name is not None and name not in loaded.runs:
            raise UserError(f"row {i + 1}: no adapter named {name!r}; have: {', '.join(loaded.names)} "
                            f"(None or {BASE!r}: the base model)")
    return names


@contextlib.contextmanager
def _routed(loaded: AnyLoaded, names: Optional[Sequence[Optional[str]]]):
    """Run one batch with each row's adapter and head (`load_runs`); nothing to do for one run's `LoadedRun`."""
    if names is None:
        yield
        return
    model, first = loaded.net.model, loaded.names[0]
    groups: dict = {}
    for i, name in enumerate(names):
        if name is not None and name != first and loaded.runs[name].head:
            groups.setdefault(name, []).append(i)
    groups = {name: torch.tensor(rows, device=loaded.device) for name, rows in groups.items()}
    busy: set = set()
    handles = [model.get_submodule(path).register_forward_hook(partial(_own_heads, loaded.runs, path, groups, busy))
               for path in (loaded.first.head if groups else ())]
    try:
        with get_adapter_set(model).routed(list(names)):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _own_heads(runs: dict, path: str, groups: dict, busy: set, module, args, output):
    """A head module's forward hook: the rows of each run in `groups` recomputed with that run's tensors
    (`functional_call` calls the module, and so this hook, again: `busy` lets that inner call through)."""
    if path in busy:
        return None
    out = output.clone()
    busy.add(path)
    try:
        for name, rows in groups.items():
            sliced = tuple(a[rows] if torch.is_tensor(a) else a for a in args)
            out[rows] = torch.func.functional_call(module, runs[name].head[path], sliced)
    finally:
        busy.discard(path)
    return out


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


class Inputs(NamedTuple):
    """An input file's rows (sentence tuples or prompt records), the adapter each names (None: none) and
    each one's line number; `named`: whether the file has an adapter column (TSV) or field (JSONL)."""

    rows: list
    adapters: list
    lines: list
    named: bool


def read_sentences(path: PathLike, columns: int) -> list[tuple[str, Optional[str]]]:
    """A TSV of one sentence (columns=1) or one sentence pair (2) a line; blank lines are skipped, and a
    first line `sentence` (`sentence1<TAB>sentence2`) is a header. Fields are not quoted (GLUE's style).
    An `adapter` column (see `read_sentence_file`) is read and left out."""
    return read_sentence_file(path, columns).rows


def read_sentence_file(path: PathLike, columns: int) -> Inputs:
    """`read_sentences`, with the adapters: a header that ends with an extra column `adapter`
    (`sentence<TAB>adapter`) lets each line end with an adapter's name (a line without it, or with it
    empty, names none)."""
    path = Path(path)
    rows, adapters, numbers, named = [], [], [], False
    for n, line in enumerate(_text_lines(path, "sentence file"), 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if n == 1 and tuple(c.strip().lower() for c in cells) in (TSV_HEADERS[columns],
                                                                  TSV_HEADERS[columns] + (ADAPTER_KEY,)):
            named = len(cells) > columns
            continue
        if len(cells) != columns and not (named and len(cells) == columns + 1):
            want = "one sentence" if columns == 1 else "two tab-separated sentences (a pair)"
            raise ArtifactError(path, f"line {n}: {len(cells)} tab-separated columns; this task takes {want} a line"
                                + (" and, after it, an optional adapter" if named else ""))
        if any(not c.strip() for c in cells[:columns]):
            raise ArtifactError(path, f"line {n}: an empty sentence")
        rows.append((cells[0], cells[1] if columns == 2 else None))
        adapters.append(cells[columns].strip() or None if len(cells) > columns else None)
        numbers.append(n)
    if not rows:
        raise ArtifactError(path, "no sentences (only a header)")
    return Inputs(rows, adapters, numbers, named)


def columns_of(cfg: mlc.ConfigDict) -> int:
    """How many sentences an example of the run's classification task has: 1, or 2 (pairs)."""
    return 2 if cfg.task in PAIR_TASKS else 1


@torch.no_grad()
def classify(loaded: AnyLoaded, rows: Sequence[tuple[str, Optional[str]]], batch_size: int = 32,
             progress: bool = False, adapters: Optional[Sequence[Optional[str]]] = None) -> list[dict]:
    """Label (text_a, text_b) rows: {"label": name, "index", "probability"} each, or {"label": score} for
    a regression task. Encoded as the run encoded its examples (truncated to model.max_length).

    `adapters` (runs loaded with `load_runs`): each row's adapter name, None for the base model (default:
    the first run's adapter for every row); the rows of a batch may differ, and each row gets its run's
    head and label names (see `load_runs`)."""
    names = _row_adapters(loaded, len(rows), adapters)
    logits = class_logits(loaded, rows, batch_size, progress, names)
    if names is None:
        return _describe(logits, loaded.labels) if rows else []
    return [_describe(logits[i:i + 1], loaded.run_of(name).labels)[0] for i, name in enumerate(names)]


@torch.no_grad()
def class_logits(loaded: AnyLoaded, rows: Sequence[tuple[str, Optional[str]]], batch_size: int = 32,
                 progress: bool = False, adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
    """The network's float32 logits for (text_a, text_b) rows, `batch_size` rows per forward (see `classify`)."""
    model, tok = loaded.net.model, loaded.net.tokenizer
    names = _row_adapters(loaded, len(rows), adapters)
    lengths = [(loaded.cfg if names is None else loaded.run_of(names[i]).cfg).model.max_length
               for i in range(len(rows))]
    encoded = [ClassificationTask._encode(Example(a, b, 0), tok, n) for (a, b), n in zip(rows, lengths)]
    out = []
    with Progress(len(encoded), "labelling", enabled=progress, unit="sentence") as bar:
        for lo in range(0, len(encoded), batch_size):
            chunk = encoded[lo:lo + batch_size]
            with _routed(loaded, None if names is None else names[lo:lo + batch_size]):
                out.append(model(**pad_batch(chunk, tok.pad_token_id or 0, loaded.device)).logits.float())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 0)


def _describe(logits: torch.Tensor, labels: Optional[tuple]) -> list[dict]:
    if labels is None:
        return [{"label": float(v)} for v in logits[:, 0].tolist()]
    probs = logits.softmax(-1)
    best = probs.argmax(-1)
    return [{"label": labels[i], "index": i, "probability": float(p)}
            for i, p in zip(best.tolist(), probs.gather(-1, best[:, None])[:, 0].tolist())]


def write_labels(path: PathLike, rows: Sequence[tuple[str, Optional[str]]], results: Sequence[dict],
                 columns: int, adapters: Optional[Sequence[str]] = None) -> None:
    """A TSV with a header: the input column(s), `adapter` (when given: each row's), `label`, and
    `probability` (not for regression)."""
    regression = bool(results) and "probability" not in results[0]
    header = list(TSV_HEADERS[columns]) + ([ADAPTER_KEY] if adapters is not None else []) + ["label"] + \
        ([] if regression else ["probability"])
    lines = ["\t".join(header)]
    for i, ((a, b), r) in enumerate(zip(rows, results)):
        cells = [a] + ([b] if columns == 2 else []) + ([adapters[i]] if adapters is not None else [])
        cells += [f"{r['label']:.6g}"] if regression else [r["label"], f"{r['probability']:.6f}"]
        lines.append("\t".join(cells))
    text = "\n".join(lines) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- answering prompts --------------------------------------------------------------------------------

def read_prompts(path: PathLike) -> list[dict]:
    """JSON lines of {"instruction", "input"?, "system"?} or {"prompt", "system"?}; blank lines skipped."""
    return read_prompt_file(path).rows


def read_prompt_file(path: PathLike) -> Inputs:
    """`read_prompts`, with the adapter each record names in an optional key "adapter" (null or "": none)."""
    path = Path(path)
    records, numbers = [], []
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
        numbers.append(n)
    adapters = [(r.get(ADAPTER_KEY) or "").strip() or None for r in records]
    return Inputs(records, adapters, numbers, any(ADAPTER_KEY in r for r in records))


def _prompt_fault(record) -> Optional[str]:
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if ("prompt" in record) == ("instruction" in record):
        return "needs exactly one of the keys 'instruction' (with an optional 'input') and 'prompt'"
    for key in ("prompt", "instruction", "input", "system", ADAPTER_KEY):
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


def generate(loaded: AnyLoaded, records: Sequence[dict], max_new_tokens: int, batch_size: int = 8,
             progress: bool = False, adapters: Optional[Sequence[Optional[str]]] = None) -> list[str]:
    """Greedy answers to prompt records (see `read_prompts`), `batch_size` prompts per generate call.

    `adapters` (runs loaded with `load_runs`): each record's adapter name, None for the base model
    (default: the first run's for every record); the records of one generate call may differ."""
    tok = loaded.net.tokenizer
    return [tok.decode(row, skip_special_tokens=True).strip()
            for row in generate_ids(loaded, records, max_new_tokens, batch_size, progress, adapters)]


def generate_ids(loaded: AnyLoaded, records: Sequence[dict], max_new_tokens: int, batch_size: int = 8,
                 progress: bool = False, adapters: Optional[Sequence[Optional[str]]] = None) -> list[list[int]]:
    """`generate`'s new tokens, not decoded. A batch of records with different adapters is ONE `generate` call
    inside `AdapterSet.routed`: generate calls the model again and again on the same batch, batch first
    (the prompt, then a token per row at a time over the key-value cache), so each row keeps its adapter."""
    model, tok = loaded.net.model, loaded.net.tokenizer
    names = _row_adapters(loaded, len(records), adapters)
    ids = [prompt_ids(tok, r) for r in records]
    out = []
    with Progress(len(ids), "generating", enabled=progress, unit="prompt") as bar:
        for lo in range(0, len(ids), batch_size):
            batch = ids[lo:lo + batch_size]
            with _routed(loaded, None if names is None else names[lo:lo + batch_size]):
                out += generate_batch(model, tok, batch, max_new_tokens)
            bar.update(len(batch))
    return out


def write_responses(path: PathLike, records: Iterable[dict], responses: Iterable[str]) -> None:
    """JSON lines: each input record with its `response`."""
    text = "".join(json.dumps({**r, "response": a}, ensure_ascii=False) + "\n" for r, a in zip(records, responses))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
