"""An adapter library: many fine-tuned adapters served together over one frozen ESMFold (`--adapter-library`).

A library is a folder whose entries (its sub-folders) are adapters, named by their folder name. An
entry is either an adapter folder (`adapter_config.json` + weights: a language-model adapter, or a trunk
adapter by its layout), or a folder holding `adapter/` and/or `trunk_adapter/` as a run writes them
(a whole slim fine-tuning run, or a copy of its adapter folders). Every adapter records the frozen
weights it was made for (their fingerprint, checked when it loads: another base is refused, naming
both, unless `--allow-other-base`); a run entry also records its pretrained ESMFold file
(`model/init_from.json`), checked against `--esmfold`. A run that trained its confidence heads beside its
adapters (`model.trainable=confidence`) brings them: its records get its pLDDT and pTM heads (applied to
their rows only, `functional_call` with the entry's tensors) and its confidence convention. A run that
trained anything else (the trunk, embeddings) is refused: its model is not the shared base.

Each FASTA record picks its adapter: a token `adapter=NAME` in its description, else the job's default
(`--adapter NAME`, `base` for none, or `auto`). `auto` scores the record against each entry's sketch of
its training sequences (k-mer containment, `fold/run/sketch.py`) and takes the best entry scoring at
least the threshold, else `base`; the choice and its score are written per record.

Records of different adapters share batches: each adapted part's AdapterSet runs them routed
(`AdapterSet.routed`, the gathered path of adapters/mixed.py). Entries load lazily, on first use, into
a least-recently-used cache of `capacity` entries (only the stacked factors stay resident).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.func import functional_call

from ...adapters import (AdapterError, AdapterLoadError, get_adapter_set, has_adapters, load_adapter,
                         read_adapter_config, unload)
from ...adapters.files import CONFIG_NAME
from ...adapters.inject import find_adapter_set
from ...adapters.mixed import MixedAdapterError, MixedAdapters
from ...data.fasta import BadRecord, FastaContents
from ...adapters.head import check_head
from ...runtime.artifacts import load_safetensors, read_json
from ...runtime.errors import ArtifactError, UserError
from ..model.build import TRUNK_FAMILIES
from ..run.confidence import ConfidenceHeads, model_heads
from ..run.checkpoint import ADAPTER_DIRS, FOLD_WEIGHTS, PRETRAINED_RECORD, PretrainedRecord
from ..run.sketch import Sketch, kmer_hashes, read_sketch

log = logging.getLogger(__name__)

BASE, AUTO = "base", "auto"
DEFAULT_CAPACITY = 64
DEFAULT_THRESHOLD = 0.1
HEAD_AXES = {"lddt_head": 1, "ptm_head": 0}  # each confidence head's input: its sample axis (states, pair)
HEAD_PREFIXES = tuple(f"{head}." for head in HEAD_AXES)
_LOADING = "library-loading"  # the transient name an entry's adapter has while its factors are copied


class LibraryError(UserError):
    pass


@dataclass(frozen=True)
class LibraryOptions:
    """How a prediction job serves a library (`predict.py --adapter-library/--adapter/--route-threshold/…`)."""

    folder: Path
    default: str = BASE  # for records without adapter=NAME: an entry's name, base or auto
    threshold: float = DEFAULT_THRESHOLD
    capacity: int = DEFAULT_CAPACITY

    def as_dict(self) -> dict:
        return {"adapter_library": str(self.folder), "adapter_default": self.default,
                "route_threshold": self.threshold, "adapter_cache": self.capacity}


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    parts: Dict[str, Path]  # "esm" / "trunk" -> adapter folder
    pretrained: Optional[PretrainedRecord] = None
    heads: Optional[Path] = None  # a run that trained its confidence heads: the file holding them


@dataclass(frozen=True)
class Choice:
    """A record's adapter (None: the base model) and how it was chosen."""

    adapter: Optional[str]
    how: str  # "fasta" (adapter=NAME in its description), "default" (--adapter), "auto"
    score: Optional[float] = None  # auto: the chosen (or best) entry's k-mer containment
    best: Optional[str] = None  # auto: the best-scoring entry, chosen or not

    @property
    def label(self) -> str:
        return self.adapter or BASE

    def as_dict(self) -> dict:
        return {"adapter": self.label, "how": self.how, "score": None if self.score is None else round(self.score, 4),
                "best_entry": self.best}


def _part_of_adapter(folder: Path) -> str:
    meta = read_adapter_config(folder)
    layouts = meta.get("layouts") or [meta.get("layout")]
    families = [entry.get("family") for entry in layouts if isinstance(entry, dict)]
    return "trunk" if families and all(f in TRUNK_FAMILIES for f in families) else "esm"


def read_entry(path: Path) -> Entry:
    """One library entry (module docstring); LibraryError naming the folder when it is none."""
    if (path / CONFIG_NAME).is_file():
        return Entry(path.name, path, {_part_of_adapter(path): path})
    parts = {part: path / d for part, d in ADAPTER_DIRS.items() if (path / d / CONFIG_NAME).is_file()}
    if not parts:
        raise LibraryError(f"{path}: not a library entry (no {CONFIG_NAME}, adapter/ or trunk_adapter/ in it)")
    weights, record = path / "model" / FOLD_WEIGHTS, path / "model" / PRETRAINED_RECORD
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                trained = sorted(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ArtifactError(weights, f"unreadable ({exc})") from None
        if not record.is_file():
            raise LibraryError(f"{path}: a run trained from scratch (no model/{PRETRAINED_RECORD}): its whole model "
                               "is its own, not adapters over a shared base; predict it with --run")
        other = [k for k in trained if not k.startswith(HEAD_PREFIXES)]
        if other:
            raise LibraryError(f"{path}: this run trained {', '.join(other[:3])}{' …' if len(other) > 3 else ''} "
                               "beside its adapters; a library serves adapters and confidence heads only (predict "
                               "it with --run)")
    pretrained = PretrainedRecord.from_dict(read_json(record), str(record)) if record.is_file() else None
    heads = weights if weights.is_file() and trained else None
    return Entry(path.name, path, parts, pretrained, heads)


def scan_library(folder: Path) -> Dict[str, Entry]:
    """The entries of a library folder, by name (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LibraryError(f"{folder}: no such adapter library (a folder of adapter folders or runs)")
    entries = {}
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if path.name in (BASE, AUTO):
            raise LibraryError(f"{path}: '{path.name}' is reserved (--adapter {path.name}); rename the entry")
        entries[path.name] = read_entry(path)
    if not entries:
        raise LibraryError(f"{folder}: holds no adapter (each entry is a sub-folder)")
    return entries


def description_adapter(description: str) -> Optional[str]:
    """NAME from a token `adapter=NAME` in a FASTA description (None without one)."""
    for token in description.split():
        if token.startswith("adapter="):
            return token.split("=", 1)[1]
    return None


class AdapterLibrary:
    """A library's entries, the per-record choices, and the resident cache over one model."""

    def __init__(self, folder: Path, capacity: int = DEFAULT_CAPACITY, allow_other_base: bool = False):
        self.folder, self.capacity, self.allow_other_base = Path(folder), int(capacity), allow_other_base
        self.entries = scan_library(self.folder)
        self.resident: "OrderedDict[str, None]" = OrderedDict()
        self.model = None
        self._sketches: Optional[Dict[str, Sketch]] = None
        self.loads = 0
        self.heads: Dict[str, Dict[str, torch.Tensor]] = {}  # resident entries' trained confidence heads
        self._routing: Optional[Sequence[Choice]] = None  # the batch being routed
        self._in_head = False
        self._confidence: Dict[str, ConfidenceHeads] = {}

    # --- choosing -----------------------------------------------------------------------------------

    def sketches(self) -> Dict[str, Sketch]:
        if self._sketches is None:
            found = {name: next((s for d in e.parts.values() if (s := read_sketch(d)) is not None), None)
                     for name, e in self.entries.items()}
            missing = sorted(n for n, s in found.items() if s is None)
            if missing:
                log.warning("no routing sketch in %s: --adapter auto never picks %s (a run written by this "
                            "version stores one)", ", ".join(missing), "it" if len(missing) == 1 else "them")
            self._sketches = {n: s for n, s in found.items() if s is not None}
        return self._sketches

    def choose(self, sequence: str, description: str, default: str, threshold: float) -> Choice:
        """The record's adapter; LibraryError for a name that is not in the library."""
        named, how = description_adapter(description), "fasta"
        if named is None:
            named, how = default, "default"
        if named == AUTO:
            queries: Dict[int, set] = {}  # the record's k-mers, hashed once per k
            scores = {n: s.containment(queries.setdefault(s.k, kmer_hashes(sequence, s.k)))
                      for n, s in self.sketches().items()}
            best = max(scores, key=scores.get) if scores else None
            score = scores[best] if best else None
            return Choice(best if best and score >= threshold else None, AUTO, score, best)
        if named == BASE:
            return Choice(None, how)
        if named not in self.entries:
            more = " …" if len(self.entries) > 8 else ""
            raise LibraryError(f"adapter {named!r} is not in the library {self.folder} (have: "
                               f"{', '.join(list(self.entries)[:8])}{more}; or base, auto)")
        return Choice(named, how)

    # --- serving -------------------------------------------------------------------------------------

    def attach(self, model, esmfold_file: Optional[Path] = None) -> None:
        """Serve over `model` (its own adapters must be merged and removed first); checks pretrained records."""
        self.model = model
        for part in ADAPTER_DIRS:
            if has_adapters(getattr(model, part)):
                raise LibraryError("the base model still carries adapters: unload them before serving a library")
        if any(e.heads is not None for e in self.entries.values()):
            for head in HEAD_AXES:
                getattr(model, head).register_forward_hook(partial(self._head_hook, head))
        recorded = [e for e in self.entries.values() if e.pretrained is not None]
        if esmfold_file is None or not recorded:
            return
        path = Path(esmfold_file)
        if path.is_dir():  # a Hugging Face ESMFold folder: runs record its weights file
            from ..run.hf_esmfold import hf_folder

            path = hf_folder(path)[1]
        served = PretrainedRecord.of(path)  # hashed once, however many entries
        for entry in recorded:
            if entry.pretrained != served:
                text = (f"{entry.path}: fine-tuned from another ESMFold (sha256 {entry.pretrained.sha256[:12]}…) than "
                        f"{esmfold_file} ({served.sha256[:12]}…)")
                if not self.allow_other_base:
                    raise LibraryError(text + " (--allow-other-base serves it anyway)")
                log.warning("%s; served anyway (--allow-other-base)", text)

    def verify(self, names: Sequence[str]) -> None:
        """Load each named entry once (within the cache), so that one made for another base or damaged is refused
        before anything is predicted."""
        for name in dict.fromkeys(names):
            self.ensure([name])

    def needs_split(self, model) -> bool:
        """Whether batches must be split by adapter: a chunked trunk flattens its batch, so trunk adapters of
        different records cannot be gathered in one forward (adapters/mixed.py)."""
        return getattr(model.trunk, "chunk_size", None) is not None and \
            any("trunk" in e.parts for e in self.entries.values())

    def ensure(self, names: Sequence[str]) -> None:
        """Make the named entries resident, evicting the least recently used beyond the capacity."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise LibraryError(f"a batch uses {len(wanted)} adapters, more than --adapter-cache {self.capacity}")
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
                continue
            while len(self.resident) >= self.capacity:
                old = next(n for n in self.resident if n not in wanted)
                self._evict(old)
            self._load(self.entries[name])
            self.resident[name] = None

    def _load(self, entry: Entry) -> None:
        for part, folder in entry.parts.items():
            module = getattr(self.model, part)
            try:
                load_adapter(module, folder, name=_LOADING, allow_other_base=self.allow_other_base)
                aset = get_adapter_set(module)
                if aset.mixed is None:  # the first entry: room for as many as can be resident, at once
                    aset.mixed = MixedAdapters(aset.layouts)
                    aset.mixed.reserve(min(self.capacity, len(self.entries)))
                aset.mix(entry.name, aset.get(_LOADING))  # factors copied into the stack; the module itself goes
                aset.remove(_LOADING)
            except AdapterLoadError as exc:  # names its file already
                raise LibraryError(f"library entry {entry.name!r}: {exc}") from None
            except (AdapterError, MixedAdapterError, ValueError) as exc:
                raise LibraryError(f"{folder}: {exc}") from None
        if entry.heads is not None:
            device = next(self.model.parameters()).device
            self.heads[entry.name] = {k: v.to(device) for k, v in load_safetensors(entry.heads).items()}
            check_head(self.model, self.heads[entry.name], entry.heads)
        self.loads += 1

    def _evict(self, name: str) -> None:
        for part in self.entries[name].parts:
            get_adapter_set(getattr(self.model, part)).unmix(name)
        self.heads.pop(name, None)
        del self.resident[name]

    def _mixed(self, part: str):
        """The part's mixed adapters (None while no entry with that part was loaded)."""
        aset = find_adapter_set(getattr(self.model, part))
        return None if aset is None else aset.mixed

    def resident_bytes(self) -> int:
        return sum(m.resident_bytes() for p in ADAPTER_DIRS if (m := self._mixed(p)) is not None)

    @contextlib.contextmanager
    def routed(self, choices: Sequence[Choice]) -> Iterator[None]:
        """Run one batch whose records use `choices` (in batch order): each adapted part routed per record."""
        self.ensure([c.adapter for c in choices if c.adapter is not None])
        with contextlib.ExitStack() as stack:
            for part in ADAPTER_DIRS:
                if self._mixed(part) is None:
                    continue
                names: List[Optional[str]] = [c.adapter if c.adapter is not None and part in
                                              self.entries[c.adapter].parts else None for c in choices]
                stack.enter_context(get_adapter_set(getattr(self.model, part)).routed(names))
            self._routing = list(choices)
            try:
                yield
            finally:
                self._routing = None

    def _head_hook(self, head: str, module, args, output):
        """While a batch is routed: the rows of records whose entry trained its confidence heads get that entry's
        head (the same module, its tensors), as `predict.py --run` of the entry computes them."""
        if self._routing is None or self._in_head:  # functional_call runs the module, and so this hook, again
            return None
        axis, prefix = HEAD_AXES[head], f"{head}."
        for name in dict.fromkeys(c.adapter for c in self._routing):
            tensors = {k[len(prefix):]: v for k, v in self.heads.get(name, {}).items() if k.startswith(prefix)}
            if not tensors:
                continue
            rows = torch.tensor([i for i, c in enumerate(self._routing) if c.adapter == name], device=output.device)
            self._in_head = True
            try:
                own = functional_call(module, tensors, (args[0].index_select(axis, rows),))
            finally:
                self._in_head = False
            output = output.index_copy(axis, rows, own.to(output.dtype))
        return output

    def confidence(self, choice: Choice, default: ConfidenceHeads) -> ConfidenceHeads:
        """What a record's confidence numbers are: its entry's run's heads when it trained them, else `default`."""
        entry = self.entries.get(choice.adapter) if choice.adapter else None
        if entry is None or entry.heads is None:
            return default
        if entry.name not in self._confidence:
            from ..run.resolve import read_run_config

            self._confidence[entry.name] = model_heads(self.model, read_run_config(entry.path))
        return self._confidence[entry.name]

    def describe(self) -> dict:
        """What predictions.json says of the library: entries, cache, loads, and the resident bytes (this process)."""
        resident = self.resident_bytes() if self.model is not None else 0
        return {"folder": str(self.folder), "entries": {n: {p: str(d) for p, d in e.parts.items()}
                                                        for n, e in self.entries.items()},
                "capacity": self.capacity, "loaded": self.loads, "resident": list(self.resident),
                "resident_bytes": resident,
                "bytes_per_resident_adapter": resident // len(self.resident) if self.resident else None}



def choose_adapters(contents: FastaContents, library: AdapterLibrary, options: LibraryOptions):
    """(contents with records naming an unknown adapter moved to the rejected ones, record id -> Choice)."""
    choices, bad = {}, []
    for record in contents.records:
        try:
            choices[record.id] = library.choose(record.sequence, record.description, options.default,
                                                options.threshold)
        except LibraryError as exc:
            bad.append(BadRecord(record.id, str(exc), record.line))
    if not bad:
        return contents, choices
    kept = [r for r in contents.records if r.id in choices]
    return FastaContents(contents.path, kept, sorted(contents.bad + bad, key=lambda b: b.line)), choices


def serve_library(library: AdapterLibrary, model, esmfold_file: Optional[Path], announce: bool = True) -> None:
    """Serve `library` over `model`: its own adapters (a run's) merged into its weights and removed first."""
    for part in ADAPTER_DIRS:
        module = getattr(model, part)
        if has_adapters(module):
            unload(module, merge=True)
    library.attach(model, esmfold_file)
    if announce:
        log.info("adapter library %s: %d entries, up to %d resident", library.folder, len(library.entries),
                 library.capacity)
