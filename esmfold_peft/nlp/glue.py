"""Sentence and sentence-pair classification data: GLUE's own files, and the offline stand-ins.

GLUE is read from the folder of the GLUE distribution (`data.glue_dir`), one subfolder per task with
its train.tsv and dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv), tab-separated as
distributed (no quoting). Test sets carry no labels, so the dev sets are the evaluation sets, as in
the paper. Each task is scored with its own metrics (scikit-learn, SciPy):

| task | folder | text | label | metrics (first = the one reported as primary) |
|---|---|---|---|---|
| cola | CoLA | sentence (col 4, no header) | 0/1 (col 2) | Matthews correlation |
| sst2 | SST-2 | sentence | 0/1 | accuracy |
| mrpc | MRPC | #1 String, #2 String | Quality | accuracy, F1 |
| stsb | STS-B | sentence1, sentence2 | score 0–5 | Pearson, Spearman |
| qqp | QQP | question1, question2 | is_duplicate | accuracy, F1 |
| mnli | MNLI | sentence1, sentence2 | gold_label (3 classes) | accuracy (matched), accuracy (mismatched) |
| qnli | QNLI | question, sentence | entailment / not_entailment | accuracy |
| rte | RTE | sentence1, sentence2 | entailment / not_entailment | accuracy |

Offline stand-ins (fetched from the package registry, see `sources`):

| task | data | label | metrics |
|---|---|---|---|
| rt-polarity | Rotten Tomatoes sentences, human scores (SST-2 style) | sign of the score (37 zeros left out) | accuracy, F1, MCC |
| rt-score | the same sentences | the score itself, −4…+4 (STS-B style regression) | Pearson, Spearman |
| corr2cause | premise/hypothesis pairs from corr2cause (MNLI style) | entailment / contradiction / neutral | accuracy, macro-F1 |

The stand-ins have no official split: a sentence goes to evaluation when the salted SHA-256 of its
text falls in the lowest `data.eval_fraction` (the same split on every machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..runtime.errors import ArtifactError, ConfigError
from . import sources

log = logging.getLogger("esmfold_peft.nlp")


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: Optional[tuple]  # label strings in index order; None for regression
    metrics: tuple  # the first is the primary metric
    folder: str = ""  # GLUE subfolder
    text_a: Union[str, int] = ""
    text_b: Union[str, int, None] = None
    label: Union[str, int] = ""
    header: bool = True
    eval_files: tuple = (("dev", "dev.tsv"),)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def primary(self) -> str:
        return self.metrics[0]


BINARY = ("0", "1")
ENTAIL2 = ("entailment", "not_entailment")
TASKS = {s.name: s for s in (
    TaskSpec("cola", BINARY, ("mcc", "accuracy"), "CoLA", 3, None, 1, header=False),
    TaskSpec("sst2", BINARY, ("accuracy",), "SST-2", "sentence", None, "label"),
    TaskSpec("mrpc", BINARY, ("accuracy", "f1"), "MRPC", "#1 String", "#2 String", "Quality"),
    TaskSpec("stsb", None, ("pearson", "spearman"), "STS-B", "sentence1", "sentence2", "score"),
    TaskSpec("qqp", BINARY, ("accuracy", "f1"), "QQP", "question1", "question2", "is_duplicate"),
    TaskSpec("mnli", ("contradiction", "entailment", "neutral"), ("accuracy",), "MNLI", "sentence1", "sentence2",
             "gold_label", eval_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv"))),
    TaskSpec("qnli", ENTAIL2, ("accuracy",), "QNLI", "question", "sentence", "label"),
    TaskSpec("rte", ENTAIL2, ("accuracy",), "RTE", "sentence1", "sentence2", "label"),
    TaskSpec("rt-polarity", BINARY, ("accuracy", "f1", "mcc")),
    TaskSpec("rt-score", None, ("pearson", "spearman")),
    TaskSpec("corr2cause", ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1")),
)}
GLUE_TASKS = tuple(n for n, s in TASKS.items() if s.folder)
SPLIT_SALT = "esmfold-peft-nlp-split-v1"


# --- metrics --------------------------------------------------------------------------------------

def compute_metrics(spec: TaskSpec, predictions: Sequence, labels: Sequence) -> dict:
    """The task's metrics from predictions (class indices, or scores for regression) and gold labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    p, y = np.asarray(predictions), np.asarray(labels)
    out = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(y, p))
        elif name == "f1":
            out[name] = float(f1_score(y, p, pos_label=1, zero_division=0))
        elif name == "macro_f1":
            out[name] = float(f1_score(y, p, average="macro", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(y, p))
        elif name in ("pearson", "spearman"):
            if np.std(p) == 0 or np.std(y) == 0:  # constant predictions: correlation undefined, report 0
                out[name] = 0.0
            else:
                out[name] = float((pearsonr if name == "pearson" else spearmanr)(p, y)[0])
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out


# --- reading ----------------------------------------------------------------------------------

def load_task(cfg) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
    """(spec, training examples, {eval set name: examples}) for cfg.task, subset per data.max_*."""
    name = cfg.task
    if name not in TASKS:
        raise ConfigError(f"unknown classification task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    d = cfg.data
    if spec.folder:
        if not d.glue_dir:
            raise ConfigError(f"task {name} reads GLUE's files: set data.glue_dir to the folder holding "
                              f"{spec.folder}/ (or use an offline task: rt-polarity, rt-score, corr2cause)")
        train, evals = read_glue(Path(d.glue_dir).expanduser(), spec)
    else:
        if name == "corr2cause":
            examples = read_corr2cause(Path(d.path) if d.path else sources.corr2cause_file(d.root or None))
        else:
            path = Path(d.path) if d.path else sources.rotten_tomatoes_file(d.root or None)
            examples = read_scored_sentences(path, regression=name == "rt-score")
        train, evals = split_examples(examples, d.eval_fraction)
    train = subset(train, d.max_train)
    evals = {k: subset(v, d.max_eval) for k, v in evals.items()}
    if not train or not all(evals.values()):
        raise ArtifactError(None, f"task {name}: no training or no evaluation examples after reading and subsetting")
    return spec, train, evals


def read_glue(glue_dir: Path, spec: TaskSpec) -> tuple[list[Example], dict[str, list[Example]]]:
    folder = glue_dir / spec.folder
    if not folder.is_dir():
        alternatives = [p.name for p in glue_dir.iterdir()] if glue_dir.is_dir() else []
        raise ArtifactError(folder, f"no such folder (GLUE's {spec.name} files belong there"
                                    + (f"; {glue_dir} holds: {', '.join(sorted(alternatives)[:10])}"
                                       if alternatives else "") + ")")
    train = read_glue_tsv(folder / "train.tsv", spec)
    evals = {name: read_glue_tsv(folder / file, spec) for name, file in spec.eval_files}
    return train, evals


def read_glue_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    if not path.is_file():
        raise ArtifactError(path, "no such file")
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    if spec.header:
        if not lines:
            raise ArtifactError(path, "empty file")
        header = lines[0].split("\t")
        columns = {name: i for i, name in enumerate(header)}
        wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ArtifactError(path, f"header lacks column(s) {missing}; it has {header}")
        ia, ib, il = (columns[spec.text_a], columns[spec.text_b] if spec.text_b else None, columns[spec.label])
        rows = lines[1:]
    else:
        ia, ib, il = spec.text_a, spec.text_b, spec.label
        rows = lines
    out, bad = [], 0
    need = max(i for i in (ia, ib, il) if i is not None)
    for row in rows:
        cells = row.split("\t")
        if len(cells) <= need or not cells[il].strip():
            bad += 1
            continue
        label = parse_label(cells[il].strip(), spec)
        if label is None:
            bad += 1
            continue
        out.append(Example(cells[ia], cells[ib] if ib is not None else None, label))
    if bad:
        log.warning("%s: skipped %d malformed or unlabelled line(s)", path, bad)
    if not out:
        raise ArtifactError(path, f"no usable {spec.name} examples")
    return out


def parse_label(text: str, spec: TaskSpec):
    if spec.labels is None:
        try:
            return float(text)
        except ValueError:
            return None
    return spec.labels.index(text) if text in spec.labels else None


def read_scored_sentences(path: Path, regression: bool) -> list[Example]:
    """`id<TAB>score<TAB>sentence` lines (vaderSentiment's ground-truth files); binary by the sign."""
    if not path.is_file():
        raise ArtifactError(path, "no such file")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        cells = line.strip().split("\t")
        if len(cells) < 3:
            continue
        try:
            score = float(cells[1])
        except ValueError:
            continue
        if regression:
            out.append(Example(cells[2], None, score))
        elif score != 0:
            out.append(Example(cells[2], None, int(score > 0)))
    if not out:
        raise ArtifactError(path, "no `id<TAB>score<TAB>sentence` lines")
    return out


PREMISE = re.compile(r"Premise:\s*(.*?)\s*Hypothesis:\s*(.*)", re.S)


def read_corr2cause(path: Path) -> list[Example]:
    """evals' corr2cause samples: a user message 'Premise: … Hypothesis: …' and an ideal 'Answer: label'."""
    if not path.is_file():
        raise ArtifactError(path, "no such file")
    labels = TASKS["corr2cause"].labels
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            user = [m["content"] for m in record["input"] if m.get("role") == "user"][-1]
            label = record["ideal"].split(":", 1)[-1].strip().lower()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ArtifactError(path, f"line {n}: not a corr2cause sample ({type(exc).__name__}: {exc})") from None
        match = PREMISE.search(user)
        if not match or label not in labels:
            raise ArtifactError(path, f"line {n}: no 'Premise: … Hypothesis: …' or unknown label {label!r}")
        out.append(Example(match.group(1), match.group(2), labels.index(label)))
    return out


def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).digest()[:8], "little") / 2**64


def split_examples(examples: list[Example], eval_fraction: float) -> tuple[list[Example], dict[str, list[Example]]]:
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    train, dev = [], []
    for ex in examples:
        (dev if _hash_fraction(f"{ex.text_a}\t{ex.text_b}") < eval_fraction else train).append(ex)
    return train, {"dev": dev}


def subset(examples: list[Example], limit: int) -> list[Example]:
    """The first `limit` examples in salted-hash order (0 = all): a fixed, label-blind sample."""
    if not limit or limit >= len(examples):
        return examples
    order = sorted(range(len(examples)), key=lambda i: _hash_fraction(f"subset:{i}"))
    return [examples[i] for i in sorted(order[:limit])]
