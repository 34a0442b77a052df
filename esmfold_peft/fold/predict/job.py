"""A FASTA file in, files out: the records of one job (sharded over processes under torchrun), their files and
predictions.json (the module docstring of `esmfold_peft.fold.predict` has the conventions)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from ...atomic import atomic_write, write_json_atomic
from ...data.fasta import CHAIN_SEPARATOR, BadRecord, FastaContents, SequenceRecord, read_fasta
from ...runtime.progress import Progress
from ...runtime.rundir import ensure_writable_dir
from ...runtime.session import resolve_device, setup_distributed, teardown_distributed, world_size
from ..model.offload import offload_language_model
from ..run.checkpoint import load_trained_model
from ..run.confidence import ConfidenceHeads, model_heads
from .inputs import (CHAIN_LINKER, DEFAULT_MAX_TOKENS, RESIDUE_INDEX_OFFSET, SUMMARY_FILE, PredictionError,
                     file_stems, length_batches, model_length, shard_records)
from .merge import DEFAULT_MERGE_TOLERANCE, MergeCheck, adapted_parts, bf16_language_model, merge_adapter_checked
from .estimate import BatchEstimator
from ...adapters.mixed import groups_by_adapter
from .library import AdapterLibrary, LibraryOptions, choose_adapters, serve_library
from .files import (TSV_FILE, failure_line, inputs_fingerprint, record_line, record_summary, reusable_summary,
                    summary_tsv, write_record_files)
from .outputs import PAE_JSON_SUFFIX, PAE_SUFFIX, STRUCTURE_FORMATS, Prediction, predict_sequences

log = logging.getLogger(__name__)

PART_FILE = ".predictions.part-{rank}-of-{world}.json"  # a leading '.': no record's stem can take it


@dataclass(frozen=True)
class PredictionRun:
    """What `predict_fasta` did.

    Attributes:
        out_dir: where the files went.
        summary_path: the overall `predictions.json`.
        predicted: the per-record summaries (as in each `<stem>.json`), in FASTA order (under
            torchrun: of all processes, the same in each).
        failures: rejected FASTA records, then records whose prediction failed (in file order).
        merge_check: the merged-vs-unmerged check, or None when nothing was merged (under
            torchrun: the largest deviations over the processes' checks).
        confidence: what the model's confidence heads are (what the pLDDT, pTM and PAE written mean).
        n_reused: records kept from an earlier job (`skip_existing`; they are in `predicted` too).
        structure_format: "pdb" or "cif", the structure files written.
    """

    out_dir: Path
    summary_path: Path
    predicted: list[dict]
    failures: list[BadRecord] = field(default_factory=list)
    merge_check: Optional[MergeCheck] = None
    confidence: Optional[ConfidenceHeads] = None
    n_reused: int = 0
    structure_format: str = "pdb"

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def tsv_path(self) -> Path:
        """`summary.tsv`, one row per FASTA record."""
        return self.out_dir / TSV_FILE


class PredictionInterrupted(KeyboardInterrupt):
    """Ctrl-C during prediction, after predictions.json (status "interrupted") and summary.tsv were written for what
    was done. A KeyboardInterrupt still (what ends a job on Ctrl-C ends it on this), with what a message needs:
    `out_dir`, `n_predicted` (records whose files are there, `n_reused` of them from an earlier job) of `n_records`
    usable records; under torchrun the counts are rank 0's merge of the parts it could read (0 on other ranks)."""

    def __init__(self, out_dir: Path, n_predicted: int, n_reused: int, n_records: int):
        super().__init__(f"interrupted after {n_predicted} of {n_records} record(s)")
        self.out_dir, self.n_predicted, self.n_reused, self.n_records = out_dir, n_predicted, n_reused, n_records


def too_long_reason(n_residues: int, n_chains: int, max_length: int) -> str:
    """Why a record longer than `max_length` is not predicted, naming the flag that changes it."""
    in_chains = f" in {n_chains} chains" if n_chains > 1 else ""
    return (f"{n_residues} residues{in_chains}, more than --max-length {max_length} (raise it, or --max-length 0 "
            "for no limit)")


def _reject_too_long(contents: FastaContents, max_length: Optional[int]) -> FastaContents:
    """The records longer than `max_length` residues (all chains) moved to the rejected ones, in file order."""
    if not max_length:
        return contents
    long = [r for r in contents.records if len(r) > max_length]
    if not long:
        return contents
    bad = contents.bad + [BadRecord(r.id, too_long_reason(len(r), len(r.chains), max_length), r.line) for r in long]
    return FastaContents(contents.path, [r for r in contents.records if len(r) <= max_length],
                         sorted(bad, key=lambda b: b.line))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def _predict_or_split(model, records: list[SequenceRecord], device: torch.device,
                      num_recycles: int, route=None) -> list[tuple[SequenceRecord, Prediction | str]]:
    """Each record with its prediction, or the reason it failed; halves a batch that runs out of memory.
    `route(records)`: the context that gives each record its own adapter (an adapter library), if any."""
    try:
        with route(records) if route is not None else contextlib.nullcontext():
            predictions = predict_sequences(model, [r.sequence for r in records], device, num_recycles)
        return list(zip(records, predictions))
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(records) == 1:
            record = records[0]
            linkers = model_length(record.sequence) - len(record)
            size = f"{len(record)} residues" + (f" (+{linkers} linker)" if linkers else "")
            return [(record, f"out of memory on {device} for {size}")]
        half = len(records) // 2
        return (_predict_or_split(model, records[:half], device, num_recycles, route)
                + _predict_or_split(model, records[half:], device, num_recycles, route))


@dataclass
class _Loaded:
    """The model to predict with and what the summary says about where it came from."""

    model: torch.nn.Module
    source: dict
    adapter: str
    heads: ConfidenceHeads  # where its pLDDT and pTM heads come from (`confidence_heads`)
    default_recycles: int


def _load_model(run_dir, checkpoint, esmfold, lm, overrides: Sequence[str], device: torch.device,
                allow_other_base: bool = False) -> _Loaded:
    if esmfold is not None:
        if checkpoint is not None or overrides:
            raise PredictionError("--checkpoint and --set change a training run; they do not apply to --esmfold")
        try:
            from ..run.esmfold_read import load_esmfold_checkpoint
        except ImportError as exc:
            raise PredictionError(f"ESMFold checkpoints cannot be loaded in this installation ({exc})") from exc
        # lm as text: the loader takes a path (fair-esm .pt, Hugging Face directory) or a fair-esm model name
        model, _ = load_esmfold_checkpoint(Path(esmfold), lm=None if lm is None else str(lm), device=str(device))
        return _Loaded(model, {"run_dir": None, "checkpoint": None, "overrides": [], "esmfold": str(esmfold),
                               "lm": None if lm is None else str(lm)}, "none", model_heads(model),
                       # esm-fold's default: the trunk's max_recycles passes, i.e. one fewer recycle
                       int(model.trunk.cfg.max_recycles) - 1)
    if lm is not None:
        raise PredictionError("--lm goes with --esmfold; a run names its language model in its config "
                              "(change it with --set model.lm.path=…)")
    model, cfg = load_trained_model(Path(run_dir), Path(checkpoint) if checkpoint else None, overrides=overrides,
                                    allow_other_base=allow_other_base)
    return _Loaded(model, {"run_dir": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else None,
                           "overrides": list(overrides), "esmfold": None, "lm": None},
                   cfg.adapter.method, model_heads(model, cfg), int(cfg.val.num_recycles))


def _part_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / PART_FILE.format(rank=rank, world=world)


def _merged_check(checks: Sequence[Optional[MergeCheck]]) -> Optional[MergeCheck]:
    """One check for several processes' merge checks: the largest deviations, all sequences."""
    checks = [c for c in checks if c is not None]
    if not checks:
        return None
    return MergeCheck(max(c.max_position_deviation for c in checks), max(c.max_plddt_deviation for c in checks),
                      checks[0].tolerance, sum(c.n_sequences for c in checks))


def predict_fasta(fasta: str | Path, run_dir: str | Path | None, out_dir: str | Path, *,
                  checkpoint: str | Path | None = None, esmfold: str | Path | None = None,
                  lm: str | Path | None = None, num_recycles: Optional[int] = None,
                  device: Optional[str] = None, max_length: Optional[int] = 1000,
                  max_tokens_per_batch: int = DEFAULT_MAX_TOKENS, chunk_size: Optional[int] = None,
                  merge: bool = True, merge_tolerance: float = DEFAULT_MERGE_TOLERANCE,
                  progress: bool = True, overrides: Sequence[str] = (), structure_format: str = "pdb",
                  skip_existing: bool = False, allow_other_base: bool = False,
                  cpu_offload: bool = False, library: Optional[LibraryOptions] = None) -> PredictionRun:
    """Predict every usable record of a FASTA file and write the files (module docstring).

    Args:
        fasta: FASTA file (optionally .gz); multimers as chains joined by ':'.
        run_dir: the training run directory (its config, exported model and adapter); None with `esmfold`.
        out_dir: output directory (created if needed; files of the same names are replaced).
        checkpoint: a training checkpoint to use instead of the run's exported model.
        esmfold: a pretrained ESMFold to predict with instead of a run: a fair-esm checkpoint (e.g.
            esmfold_3B_v1.pt) or a Hugging Face EsmForProteinFolding folder.
        lm: the ESM-2 for `esmfold`: a fair-esm .pt, a Hugging Face ESM directory or a fair-esm model
            name; None takes a Hugging Face folder's own, or the one a fair-esm checkpoint's config names.
        num_recycles: trunk recycles; None takes the run's `val.num_recycles` (ESMFold: as esm-fold,
            the trunk's max_recycles passes).
        device: 'cpu', 'cuda', 'cuda:1', ...; None picks CUDA when available (under torchrun, each
            process's own GPU).
        max_length: most residues accepted per record (longer records are rejected); None or 0 for no limit.
        max_tokens_per_batch: token budget per batch (sequences × longest, linkers included).
        chunk_size: chunk the trunk's triangular attention (None: the model's setting, by default unchunked).
        merge: merge the adapter into the language model (checked on the first batch).
        merge_tolerance: largest deviation (Å, pLDDT points) accepted between merged and unmerged.
        progress: show a progress bar (rank 0 only under torchrun).
        overrides: `key=value` changes to the run's config, e.g. `model.lm.path=…` for a moved
            language model.
        structure_format: "pdb" (`<stem>.pdb`) or "cif" (`<stem>.cif`, mmCIF: the same atoms and B-factors).
        skip_existing: keep a record whose `<stem>.json` was written from the same sequence, model source,
            recycles and format, with its files there (its summary is reused); others are predicted again.
        allow_other_base: load the run's adapters onto frozen weights other than those they were trained
            on (a language model replaced with `model.lm.path=…`); refused by default.
        cpu_offload: keep the language model's layers on the CPU, each copied to the GPU for its own
            forward (`fold.model.offload`; adapters then apply unmerged). Needs a GPU device.
        library: serve an adapter library over the model (`library.py`): each record runs with the
            adapter it names (`adapter=NAME` in its description), the default, or the one `auto` routes
            it to; records of different adapters share batches. A record naming an unknown adapter is
            rejected; the model's own adapters (a run's) are merged first, and nothing else is merged.

    `predictions.json` and `summary.tsv` are always written, atomically, for what was done, also when
    interrupted (then `PredictionInterrupted`, a KeyboardInterrupt, is raised with the counts).
    What the confidence numbers mean follows the model's heads (`confidence_heads`); those of a head
    that was never trained are not written, and the job logs one warning saying why.
    Raises FastaError (unusable FASTA file), CheckpointError and friends (unusable run or
    checkpoint), PredictionError (no usable device, contradictory arguments) and MergeMismatchError
    (merging changed the outputs). Problems with single records end up in `PredictionRun.failures`.
    """
    started = time.perf_counter()
    _check_arguments(run_dir, esmfold, num_recycles, chunk_size, max_tokens_per_batch, max_length, structure_format)
    contents = _reject_too_long(read_fasta(fasta), max_length)
    served, choices = None, {}
    if library is not None:
        served = AdapterLibrary(library.folder, library.capacity, allow_other_base)
        contents, choices = choose_adapters(contents, served, library)
    world = world_size()
    own_group = world > 1 and not dist.is_initialized()
    torch_device, rank = _device_and_rank(device, world)
    finished = False
    try:
        run = _predict(contents, fasta, run_dir, out_dir, checkpoint=checkpoint, esmfold=esmfold, lm=lm,
                       num_recycles=num_recycles, torch_device=torch_device, rank=rank, world=world,
                       max_tokens_per_batch=max_tokens_per_batch, chunk_size=chunk_size, merge=merge,
                       merge_tolerance=merge_tolerance, progress=progress, overrides=overrides, started=started,
                       settings={"max_length": max_length or None, "max_tokens_per_batch": max_tokens_per_batch,
                                 "format": structure_format, "skip_existing": bool(skip_existing),
                                 "allow_other_base": bool(allow_other_base), "cpu_offload": bool(cpu_offload),
                                 **(library.as_dict() if library else {})},
                       served=(served, choices))
        finished = True
        return run
    finally:
        if own_group:
            teardown_distributed(synchronize=finished)


def _device_and_rank(device: Optional[str], world: int) -> tuple[torch.device, int]:
    """This process's device and rank (under torchrun: the process group set up, each process its own GPU)."""
    if world == 1:
        return resolve_device(device), 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _, torch_device = setup_distributed(f"cuda:{local_rank}" if device == "cuda" else device)
    return torch_device, dist.get_rank()


def _check_arguments(run_dir, esmfold, num_recycles, chunk_size, max_tokens_per_batch, max_length,
                     structure_format) -> None:
    if (run_dir is None) == (esmfold is None):
        raise PredictionError("predict with either a training run or an ESMFold checkpoint (exactly one of them)")
    if num_recycles is not None and num_recycles < 0:
        raise PredictionError(f"num_recycles must be >= 0, got {num_recycles}")
    if chunk_size is not None and chunk_size < 1:
        raise PredictionError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_tokens_per_batch < 1:
        raise PredictionError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    if max_length is not None and max_length < 0:
        raise PredictionError(f"max_length must be >= 0 (0: no limit), got {max_length}")
    if structure_format not in STRUCTURE_FORMATS:
        raise PredictionError(f"structure format must be one of {', '.join(STRUCTURE_FORMATS)}, got "
                              f"{structure_format!r}")


def _source_key(source: dict) -> dict:
    """The model's source for the inputs fingerprint: paths made absolute (the same run named from elsewhere)."""
    key = dict(source)
    for name in ("run_dir", "checkpoint", "esmfold", "lm"):
        if key.get(name) is not None and (name != "lm" or Path(key[name]).exists()):
            key[name] = os.path.abspath(key[name])
    return key


class PredictionWriter:
    """What one process writes: each record's files (structure, PAE, JSON), its share of predictions.json, and on
    rank 0 (under torchrun: merging every process's share) predictions.json and summary.tsv."""

    def __init__(self, out_dir: Path, fasta, contents, mine: list, loaded: "_Loaded", settings: dict,
                 rank: int, world: int, device, started: float):
        self.out_dir, self.fasta, self.contents, self.mine, self.loaded = out_dir, fasta, contents, mine, loaded
        self.settings, self.rank, self.world, self.device, self.started = settings, rank, world, device, started
        self.order = {r.id: i for i, r in enumerate(contents.records)}
        self.stems = dict(zip((r.id for r in contents.records), file_stems([r.id for r in contents.records])))
        self.summaries: dict[str, dict] = {}
        self.reused: list[str] = []  # ids of records kept from an earlier job (`reuse`)
        self.failed: list[BadRecord] = []  # records whose prediction failed (FASTA rejections: contents.bad)
        self.merge_check: Optional[MergeCheck] = None
        self.library: Optional[AdapterLibrary] = None  # an adapter library served over the model, and each
        self.choices: dict = {}  # record's choice of adapter (record id -> library.Choice)
        self.done, self.total = 0, len(mine)  # for the per-record lines
        self.source_key = _source_key(loaded.source)
        if world > 1:  # a part left by an earlier, interrupted run must not be merged into this one
            _part_path(out_dir, rank, world).unlink(missing_ok=True)

    def inputs(self, record) -> dict:
        """The record's inputs fingerprint (`inputs_fingerprint`; with a library, its adapter as well)."""
        source = self.source_key if self.library is None else \
            {**self.source_key, "adapter_library": os.path.abspath(self.library.folder),
             "adapter": self.choices[record.id].label}
        return inputs_fingerprint(record.sequence, source, self.settings["num_recycles"], self.settings["format"])

    @property
    def route(self):
        """The context that runs a batch of records each with its own adapter (None without a library)."""
        if self.library is None:
            return None
        return lambda records: self.library.routed([self.choices[r.id] for r in records])

    def reuse(self, records: list) -> list:
        """The records still to predict: with `skip_existing`, those whose files an earlier job wrote from the same
        inputs are kept (their summaries reused) and left out."""
        if not self.settings["skip_existing"]:
            return records
        todo = []
        for record in records:
            summary = reusable_summary(self.out_dir, self.stems[record.id], record, self.inputs(record))
            if summary is None:
                todo.append(record)
            else:
                self.summaries[record.id] = summary
                self.reused.append(record.id)
        self.total = len(todo)
        if self.reused and self.rank == 0:
            by = " by this process" if self.world > 1 else ""
            log.info("kept %d record(s) an earlier job predicted from the same sequence and settings%s "
                     "(--skip-existing); %d to predict", len(self.reused), by, len(todo))
        return todo

    def write(self, record, result) -> None:
        """One record's outcome: its files, or its failure; and its line on stderr (rank 0)."""
        if isinstance(result, Prediction) and not result.finite:
            result = "non-finite coordinates or pLDDT in the prediction"
        self.done += 1
        if isinstance(result, str):
            self.failed.append(BadRecord(record.id, result, record.line))
            if self.rank == 0:
                log.info("%s", failure_line(record, result, self.done, self.total, self.rank, self.world))
            return
        stem, heads = self.stems[record.id], self.loaded.heads
        if self.library is not None:  # an entry that trained its confidence heads: its own convention
            heads = self.library.confidence(self.choices[record.id], heads)
        summary = record_summary(record, result, stem, self.settings, heads, self.inputs(record))
        if self.library is not None:
            choice = self.choices[record.id]
            summary.update(adapter=choice.label, routing=choice.as_dict(), confidence=heads.as_dict())
        write_record_files(self.out_dir, stem, record, result, heads, summary)
        self.summaries[record.id] = summary
        if self.rank == 0:
            log.info("%s", record_line(summary, self.done, self.total, self.rank, self.world))

    def part(self, status: str) -> dict:
        """This process's share of predictions.json."""
        return {"rank": self.rank, "status": status, "device": str(self.device),
                "merge_check": self.merge_check.as_dict() if self.merge_check else None,
                "predictions": [self.summaries[r.id] for r in self.mine if r.id in self.summaries],
                "reused": list(self.reused),
                "failures": [{"id": f.id, "line": f.line, "reason": f.reason} for f in self.failed]}

    def summary(self, parts: list[dict]) -> dict:
        """predictions.json from the processes' parts."""
        records, bad, model, heads = self.contents.records, self.contents.bad, self.loaded.model, self.loaded.heads
        predicted = sorted((p for pt in parts for p in pt["predictions"]), key=lambda p: self.order[p["id"]])
        prediction_failures = sorted((f for pt in parts for f in pt["failures"]), key=lambda f: f["line"])
        combined = _merged_check([_check_from_dict(pt["merge_check"]) for pt in parts])
        statuses = {pt["status"] for pt in parts}
        return {
            "status": "completed" if statuses == {"completed"} and len(parts) == self.world else "interrupted",
            "fasta": str(self.fasta), **self.loaded.source, "adapter": self.loaded.adapter,
            "adapter_merged": combined is not None, "merge_check": combined.as_dict() if combined else None,
            "language_model": getattr(model, "lm_description", ""),
            "device": parts[0]["device"] if parts else str(self.device), "processes": self.world,
            **self.settings, "chunk_size": getattr(model.trunk, "chunk_size", None),
            "multimer": {"chain_separator": CHAIN_SEPARATOR, "chain_linker": CHAIN_LINKER,
                         "residue_index_offset": RESIDUE_INDEX_OFFSET, "linker_in_outputs": False,
                         "ptm": "without the linker", "residue_numbering": "each chain from 1",
                         "ptm_per_chain": "pTM of each chain alone", "iptm": "interface pTM (AF-multimer): for "
                         "each residue, the TM terms of the other chains' residues, averaged; the largest"},
            "confidence": heads.as_dict(),
            "pae": (f"<stem>{PAE_SUFFIX}: 'pae', predicted aligned error in Å, float16 [L, L], linkers removed; "
                    f"<stem>{PAE_JSON_SUFFIX}: the same in AlphaFold DB's JSON format, 2 decimals"
                    if heads.ptm else "not written: the pTM head was never trained"),
            "ptm_head_trained": heads.ptm, "summary_tsv": TSV_FILE,
            "library": self.library.describe() if self.library is not None else None,
            "n_records": len(records) + len(bad), "n_predicted": len(predicted),
            "n_reused": sum(len(pt.get("reused", [])) for pt in parts),
            "n_failed": len(bad) + len(prediction_failures),
            "n_not_reached": len(records) - len(predicted) - len(prediction_failures),
            "seconds_total": time.perf_counter() - self.started,
            "predictions": predicted,
            "failures": [{"id": f.id, "line": f.line, "reason": f.reason} for f in bad] + prediction_failures,
        }

    def _write_summaries(self, merged: dict) -> None:
        """predictions.json and summary.tsv, each atomically."""
        write_json_atomic(self.out_dir / SUMMARY_FILE, merged)
        tsv = summary_tsv(self.contents, merged)
        atomic_write(self.out_dir / TSV_FILE, lambda tmp: Path(tmp).write_text(tsv))

    def finish(self, status: str) -> dict:
        """Write predictions.json and summary.tsv (under torchrun rank 0 merges the processes' parts) and return
        predictions.json's content ({} on the other ranks of an interrupted job)."""
        out, rank, world = self.out_dir, self.rank, self.world
        if world == 1:
            merged = self.summary([self.part(status)])
            self._write_summaries(merged)
            return merged
        write_json_atomic(_part_path(out, rank, world), self.part(status))
        if status != "completed":  # no barrier: the others may be gone; rank 0 merges what is there
            if rank != 0:
                return {}
            merged = self.summary(_read_parts(out, world))
            self._write_summaries(merged)
            return merged
        dist.barrier()
        merged = self.summary(_read_parts(out, world))
        if rank == 0:
            self._write_summaries(merged)
        dist.barrier()  # every process has read the parts, and predictions.json exists
        if rank == 0:
            for r in range(world):
                _part_path(out, r, world).unlink(missing_ok=True)
        return merged


def _prepare(contents, fasta, run_dir, out_dir, *, checkpoint, esmfold, lm, num_recycles, torch_device, rank,
             world, max_tokens_per_batch, chunk_size, overrides, started, settings, served):
    """(model, writer, batches still to predict): the model loaded, the records shared out and batched."""
    if rank == 0:
        for bad in contents.bad:
            log.warning("skipping FASTA record %s", bad)
    out_dir = ensure_writable_dir(Path(out_dir))
    loaded = _load_model(run_dir, checkpoint, esmfold, lm, overrides, torch_device,
                         allow_other_base=settings["allow_other_base"])
    if rank == 0:  # once per job, not per record
        for message in loaded.heads.warnings():
            log.warning(message)
    model = loaded.model
    library, choices = served
    if library is not None:
        serve_library(library, model, esmfold, announce=rank == 0)
    model.to(torch_device).eval()
    if settings["cpu_offload"]:
        if torch_device.type != "cuda":
            raise PredictionError(f"--cpu-offload keeps the language model on the CPU while predicting on a GPU; the "
                                  f"device here is {torch_device} (without a GPU, leave --cpu-offload out)")
        offload = offload_language_model(model, torch_device)
        log.info("language model layers kept on the CPU (%.2f GiB), each copied to %s for its forward%s",
                 offload.host_bytes / 2 ** 30, torch_device,
                 "; adapters apply unmerged" if adapted_parts(model) else "")
    if chunk_size is not None:
        model.trunk.set_chunk_size(chunk_size)
    recycles = int(loaded.default_recycles if num_recycles is None else num_recycles)
    records = contents.records
    mine = ([records[i] for i in shard_records([model_length(r.sequence) for r in records], world)[rank]]
            if world > 1 else records)
    writer = PredictionWriter(out_dir, fasta, contents, mine, loaded, {"num_recycles": recycles, **settings},
                              rank, world, torch_device, started)
    writer.library, writer.choices = library, choices
    if library is not None:  # every entry this job uses loads now: a refusal comes before any prediction
        library.verify([choices[r.id].adapter for r in mine if choices[r.id].adapter is not None])
    todo = writer.reuse(mine)
    batches = [[todo[i] for i in batch]
               for batch in length_batches([model_length(r.sequence) for r in todo], max_tokens_per_batch)]
    if library is not None and library.needs_split(model):
        batches = [[batch[i] for i in rows] for batch in batches
                   for rows in groups_by_adapter([choices[r.id].label for r in batch]).values()]
    return model, writer, batches


def _run_batches(model, batches: list, writer: PredictionWriter, bar: Progress, device, recycles: int,
                 merge: bool, merge_tolerance: float) -> None:
    """Predict the batches and write each record's outcome (the adapter merged first, checked on the first batch)."""
    done = {}
    estimator = BatchEstimator(model, device, recycles, log)
    lengths = [[model_length(r.sequence) for r in batch] for batch in batches]
    if merge and bf16_language_model(model):  # merged weights would be rounded to bf16: keep hooks
        log.info("the language model is stored in bf16: adapters are applied unmerged")
        merge = False
    if merge and writer.library is not None:
        merge = False  # records of different adapters share batches: nothing can be merged
    if merge and adapted_parts(model) and batches:
        estimator.before(lengths[0])
        writer.merge_check, merged = merge_adapter_checked(model, [r.sequence for r in batches[0]], device,
                                                           recycles, merge_tolerance)
        done[0] = list(zip(batches[0], merged))  # the check's merged outputs are the first batch's results
        c = writer.merge_check
        log.info("adapter merged: max deviation from unmerged %.2g Å (positions), %.2g (pLDDT) on %d "
                 "sequence(s)", c.max_position_deviation, c.max_plddt_deviation, c.n_sequences)
    # on a terminal, log lines (one per record) go through tqdm so that they do not break the bar
    with logging_redirect_tqdm() if bar.bar is not None else contextlib.nullcontext():
        for k, batch in enumerate(batches):
            if k in done:
                results = done.pop(k)
            else:
                estimator.before(lengths[k])
                started = time.perf_counter()
                results = _predict_or_split(model, batch, device, recycles, writer.route)
                estimator.after(lengths[k], time.perf_counter() - started)
            for record, result in results:
                writer.write(record, result)
            bar.update(len(batch), length=lengths[k][-1], batch=len(batch))


def _predict(contents, fasta, run_dir, out_dir, *, torch_device, rank, world, merge, merge_tolerance, progress,
             **kwargs) -> PredictionRun:
    model, writer, batches = _prepare(contents, fasta, run_dir, out_dir, torch_device=torch_device, rank=rank,
                                      world=world, **kwargs)
    bar = Progress(writer.total, "predicting", enabled=progress and rank == 0, unit="seq")
    try:
        _run_batches(model, batches, writer, bar, torch_device, writer.settings["num_recycles"],
                     merge and not writer.settings["cpu_offload"],
                     merge_tolerance)
    except KeyboardInterrupt:
        bar.close()
        merged = writer.finish("interrupted")
        raise PredictionInterrupted(writer.out_dir, merged.get("n_predicted", 0), merged.get("n_reused", 0),
                                    len(contents.records)) from None
    bar.close()
    merged = writer.finish("completed")
    failures = list(contents.bad) + [BadRecord(f["id"], f["reason"], f["line"])
                                     for f in merged["failures"][len(contents.bad):]]
    return PredictionRun(writer.out_dir, writer.out_dir / SUMMARY_FILE, merged["predictions"], failures,
                         _check_from_dict(merged["merge_check"]), writer.loaded.heads, merged["n_reused"],
                         writer.settings["format"])


def _check_from_dict(d: Optional[dict]) -> Optional[MergeCheck]:
    if not d:
        return None
    return MergeCheck(d["max_position_deviation_angstrom"], d["max_plddt_deviation"], d["tolerance"], d["n_sequences"])


def _read_parts(out_dir: Path, world: int) -> list[dict]:
    """The processes' part summaries that exist and can be read."""
    parts = []
    for r in range(world):
        try:
            parts.append(json.loads(_part_path(out_dir, r, world).read_text()))
        except (OSError, ValueError):
            continue
    return parts
