"""Structures from sequences with a trained run: length-sorted batches, a merged adapter, PDB + JSON out.

    run = predict_fasta("seqs.fasta", "runs/demo-lorta-r8", "predictions/")

For each usable FASTA record (see `esmfold_peft.data.fasta` for what is accepted) it writes
`<stem>.pdb` and `<stem>.json` into the output directory, and `predictions.json` for the whole
file. Conventions:

* PDB: one chain A, residues numbered 1..L, every heavy atom the residue type has (atom37 from the
  structure module's atom14 positions, as ESMFold writes them). X residues are written as UNK with
  a Cα only, at the origin of the predicted backbone frame (the model places no other atom for
  them; for the 20 standard residues that origin is exactly the predicted Cα);
* B-factor column: the residue's pLDDT (0..100) on every atom of the residue. It is the model's Cα
  pLDDT, the channel the pLDDT-Cα loss trains and validation reports;
* `<stem>` is the record id made filesystem-safe (`file_stems`);
* batches: records are sorted by length and packed while (sequences × longest length) stays within
  the residue budget; shorter sequences are padded and masked, and results do not depend on the
  batching beyond float rounding. A batch that runs out of GPU memory is split in halves and
  retried, down to single sequences; a sequence that still does not fit is reported as failed;
* adapter: merged into the language model's weights for inference by default (the base model's
  cost), after checking on the first batch that merged outputs equal unmerged ones
  (`merge_adapter_checked`); a mismatch beyond the tolerance is an error.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import compat  # noqa: F401  (must precede openfold imports)
from ..adapters import get_adapter_set, has_adapters
from ..atomic import atomic_write, write_json_atomic
from ..data.fasta import BadRecord, SequenceRecord, read_fasta
from ..runtime.errors import UserError
from ..runtime.rundir import ensure_writable_dir
from ..runtime.session import resolve_device
from ..runtime.text import finite_or_none
from .checkpoint import load_trained_model
from .model import CA, predicted_atom37

from openfold.np import protein as of_protein  # noqa: E402
from openfold.np import residue_constants  # noqa: E402

log = logging.getLogger(__name__)

SUMMARY_FILE = "predictions.json"
MAX_STEM_LENGTH = 100
# Merging changes float32 rounding in the LM (~1e-6), which the trunk and recycling amplify: on the
# demo model a 230-residue chain moved by 0.008 Å and 0.01 pLDDT points. A wrong merge moves atoms by Å.
DEFAULT_MERGE_TOLERANCE = 0.05


class PredictionError(UserError):
    """Prediction cannot start (e.g. the device asked for is not available)."""


class MergeMismatchError(PredictionError):
    """Merging the adapter into the language model changed the outputs beyond the tolerance."""


# --- inputs -------------------------------------------------------------------------------------

def encode_sequences(sequences: Sequence[str]) -> dict[str, torch.Tensor]:
    """aatype (openfold order, X = 20), mask and 0-based residue_index, [B, L] padded to the longest."""
    length = max(len(s) for s in sequences)
    aatype = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.float32)
    for i, seq in enumerate(sequences):
        aatype[i, :len(seq)] = torch.tensor([residue_constants.restype_order_with_x[c] for c in seq])
        mask[i, :len(seq)] = 1.0
    residue_index = torch.arange(length).expand(len(sequences), length).clone()
    return {"aatype": aatype, "mask": mask, "residue_index": residue_index}


def length_batches(lengths: Sequence[int], max_residues: int) -> list[list[int]]:
    """Indices into `lengths` grouped into batches, shortest sequences first.

    A batch holds as many sequences as keep (number of sequences × its longest length) within
    `max_residues`; a sequence longer than the budget is a batch of its own. Equal lengths keep
    their input order.
    """
    if max_residues < 1:
        raise ValueError(f"the residue budget per batch must be positive, got {max_residues}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_residues:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def file_stems(ids: Sequence[str]) -> list[str]:
    """A filesystem-safe file stem for each record id, unique even on case-insensitive file systems.

    Characters other than letters, digits, '.', '_' and '-' become '_', a leading '.' becomes '_',
    stems are cut to MAX_STEM_LENGTH characters, and a stem already taken (or 'predictions', the
    name of the overall summary) gets '-2', '-3', ... appended, in input order.
    """
    taken = {Path(SUMMARY_FILE).stem.lower()}
    stems = []
    for record_id in ids:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:MAX_STEM_LENGTH]
        base = "_" + base[1:] if base.startswith(".") else base
        stem, n = base, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


# --- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """One predicted structure.

    Attributes:
        sequence: the sequence predicted (20 standard residues and X).
        atom_positions: float32 [L, 37, 3], Å.
        atom_mask: float32 [L, 37], 1 where the atom is written.
        plddt: float32 [L], per-residue (Cα) pLDDT in 0..100.
        ptm: predicted TM-score of the chain.
        seconds: wall time of the batch's forward pass divided by its size (padded sequences cost
            the same, so this is each one's share).
        batch_size: sequences in the batch it was predicted in.
    """

    sequence: str
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    plddt: np.ndarray
    ptm: float
    seconds: float
    batch_size: int

    @property
    def mean_plddt(self) -> float:
        return float(self.plddt.mean())

    @property
    def finite(self) -> bool:
        """Coordinates of written atoms and pLDDT are all finite."""
        return bool(np.isfinite(self.atom_positions[self.atom_mask > 0]).all() and np.isfinite(self.plddt).all())

    def to_pdb(self, remark: Optional[str] = None) -> str:
        """PDB text: chain A, residues 1..L, pLDDT in the B-factor column (module docstring)."""
        aatype = np.array([residue_constants.restype_order_with_x[c] for c in self.sequence])
        prot = of_protein.Protein(
            atom_positions=self.atom_positions, aatype=aatype, atom_mask=self.atom_mask,
            residue_index=np.arange(1, len(self.sequence) + 1),
            b_factors=np.repeat(self.plddt[:, None], self.atom_mask.shape[1], axis=1), remark=remark)
        return of_protein.to_pdb(prot)


@torch.no_grad()
def predict_sequences(model, sequences: Sequence[str], device: torch.device, num_recycles: int) -> list[Prediction]:
    """Predict a batch of sequences in one forward pass (the model must be in eval mode)."""
    batch = {k: v.to(device) for k, v in encode_sequences(sequences).items()}
    start = time.perf_counter()
    out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=num_recycles)
    atoms = predicted_atom37(out, batch["mask"])
    positions, mask = (t.float().cpu().numpy() for t in atoms)
    plddt = out["plddt"][..., CA].float().cpu().numpy()
    ptm = out["ptm"].float().cpu().numpy()
    seconds = (time.perf_counter() - start) / len(sequences)  # .cpu() waited for the device
    return [Prediction(seq, positions[i, :len(seq)], mask[i, :len(seq)], plddt[i, :len(seq)], float(ptm[i]),
                       seconds, len(sequences)) for i, seq in enumerate(sequences)]


def _max_deviation(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|; an entry non-finite on both sides counts as equal, on one side only as NaN (a mismatch)."""
    if a.size == 0:
        return 0.0
    both_bad = ~np.isfinite(a) & ~np.isfinite(b)
    return float(np.max(np.where(both_bad, 0.0, np.abs(a - b))))


@dataclass(frozen=True)
class MergeCheck:
    """Merged against unmerged outputs on the same sequences.

    Attributes:
        max_position_deviation: Å, over every written atom of every sequence checked.
        max_plddt_deviation: pLDDT points (0..100 scale).
        tolerance: the largest deviation accepted, for both.
        n_sequences: sequences compared.
    """

    max_position_deviation: float
    max_plddt_deviation: float
    tolerance: float
    n_sequences: int

    @property
    def ok(self) -> bool:
        return self.max_position_deviation <= self.tolerance and self.max_plddt_deviation <= self.tolerance

    def as_dict(self) -> dict:
        return {"max_position_deviation_angstrom": self.max_position_deviation,
                "max_plddt_deviation": self.max_plddt_deviation, "tolerance": self.tolerance,
                "n_sequences": self.n_sequences, "ok": self.ok}


def merge_adapter_checked(model, sequences: Sequence[str], device: torch.device, num_recycles: int,
                          tolerance: float = DEFAULT_MERGE_TOLERANCE) -> tuple[MergeCheck, list[Prediction]]:
    """Merge the language model's active adapter into its weights, checking the outputs on `sequences`.

    Returns the check and the merged model's predictions of `sequences` (so they need not be run
    again). Raises MergeMismatchError, with the deviations, when merging changed the outputs by more
    than `tolerance` (the adapter is then unmerged again).
    """
    adapters = get_adapter_set(model.esm)
    unmerged = predict_sequences(model, sequences, device, num_recycles)
    adapters.merge()
    merged = predict_sequences(model, sequences, device, num_recycles)
    check = MergeCheck(
        max_position_deviation=max(_max_deviation(u.atom_positions[u.atom_mask > 0], m.atom_positions[m.atom_mask > 0])
                                   for u, m in zip(unmerged, merged)),
        max_plddt_deviation=max(_max_deviation(u.plddt, m.plddt) for u, m in zip(unmerged, merged)),
        tolerance=tolerance, n_sequences=len(sequences))
    if not check.ok:
        adapters.unmerge()
        raise MergeMismatchError(
            f"merging the adapter changed the outputs on {len(sequences)} sequence(s): max deviation "
            f"{check.max_position_deviation:.3g} Å in atom positions and {check.max_plddt_deviation:.3g} in pLDDT, "
            f"tolerance {tolerance:g} (predict with --no-merge to run the adapter unmerged)")
    return check, merged


# --- a FASTA file in, files out -----------------------------------------------------------------

@dataclass(frozen=True)
class PredictionRun:
    """What `predict_fasta` did.

    Attributes:
        out_dir: where the files went.
        summary_path: the overall `predictions.json`.
        predicted: the per-record summaries (as in each `<stem>.json`), in FASTA order.
        failures: rejected FASTA records and records whose prediction failed.
        merge_check: the merged-vs-unmerged check, or None when nothing was merged.
    """

    out_dir: Path
    summary_path: Path
    predicted: list[dict]
    failures: list[BadRecord] = field(default_factory=list)
    merge_check: Optional[MergeCheck] = None

    @property
    def ok(self) -> bool:
        return not self.failures


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def _predict_or_split(model, records: list[SequenceRecord], device: torch.device,
                      num_recycles: int) -> list[tuple[SequenceRecord, Prediction | str]]:
    """Each record with its prediction, or the reason it failed; halves a batch that runs out of memory."""
    try:
        return list(zip(records, predict_sequences(model, [r.sequence for r in records], device, num_recycles)))
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(records) == 1:
            return [(records[0], f"out of memory on {device} for {len(records[0])} residues")]
        half = len(records) // 2
        return (_predict_or_split(model, records[:half], device, num_recycles)
                + _predict_or_split(model, records[half:], device, num_recycles))


def _record_summary(record: SequenceRecord, prediction: Prediction, stem: str, num_recycles: int) -> dict:
    return {"id": record.id, "description": record.description, "length": len(record),
            "mean_plddt": prediction.mean_plddt, "ptm": finite_or_none(prediction.ptm), "seconds": prediction.seconds,
            "batch_size": prediction.batch_size, "num_recycles": num_recycles, "pdb": f"{stem}.pdb",
            "substitutions": record.substitutions, "sequence": record.sequence}


def predict_fasta(fasta: str | Path, run_dir: str | Path, out_dir: str | Path, *,
                  checkpoint: str | Path | None = None, num_recycles: Optional[int] = None,
                  device: Optional[str] = None, max_length: Optional[int] = 1000, batch_residues: int = 1024,
                  merge: bool = True, merge_tolerance: float = DEFAULT_MERGE_TOLERANCE,
                  progress: bool = True, overrides: Sequence[str] = ()) -> PredictionRun:
    """Predict every usable record of a FASTA file with a trained run and write the files.

    Args:
        fasta: FASTA file (optionally .gz).
        run_dir: the training run directory (its config, exported model and adapter).
        out_dir: output directory (created if needed; files of the same names are replaced).
        checkpoint: a training checkpoint to use instead of the run's exported model.
        num_recycles: trunk recycles; None takes the run's `val.num_recycles`.
        device: 'cpu', 'cuda', 'cuda:1', ...; None picks CUDA when available.
        max_length: longest sequence accepted (longer records are rejected); None for no limit.
        batch_residues: residue budget per batch (sequences × longest length).
        merge: merge the adapter into the language model (checked on the first batch).
        merge_tolerance: largest deviation (Å, pLDDT points) accepted between merged and unmerged.
        progress: show a progress bar.
        overrides: `key=value` changes to the run's config, e.g. `model.lm.path=…` for a moved
            language model or `model.trunk.chunk_size=64`.

    `predictions.json` is always written, atomically, for what was done, also when interrupted.
    Raises FastaError (unusable FASTA file), CheckpointError and friends (unusable run),
    PredictionError (no usable device) and MergeMismatchError (merging changed the outputs).
    Problems with single records end up in `PredictionRun.failures`.
    """
    started = time.perf_counter()
    if num_recycles is not None and num_recycles < 0:
        raise PredictionError(f"num_recycles must be >= 0, got {num_recycles}")
    contents = read_fasta(fasta, max_length=max_length)
    for bad in contents.bad:
        log.warning("skipping FASTA record %s", bad)
    torch_device = resolve_device(device)
    out_dir = ensure_writable_dir(Path(out_dir))
    model, cfg = load_trained_model(Path(run_dir), Path(checkpoint) if checkpoint else None, overrides=overrides)
    model.to(torch_device).eval()
    recycles = int(cfg.val.num_recycles if num_recycles is None else num_recycles)

    records = contents.records
    stems = dict(zip((r.id for r in records), file_stems([r.id for r in records])))
    batches = [[records[i] for i in batch] for batch in length_batches([len(r) for r in records], batch_residues)]
    bar = tqdm(total=len(records), desc="predicting", unit="seq", disable=not progress)
    merge_check, done = None, {}
    summaries: dict[str, dict] = {}
    failures = list(contents.bad)
    summary_path = out_dir / SUMMARY_FILE

    def write_summary(status: str) -> None:
        predicted = [summaries[r.id] for r in records if r.id in summaries]
        write_json_atomic(summary_path, {
            "status": status, "fasta": str(fasta), "run_dir": str(run_dir),
            "checkpoint": str(checkpoint) if checkpoint else None, "overrides": list(overrides),
            "adapter": cfg.adapter.method, "adapter_merged": merge_check is not None,
            "merge_check": merge_check.as_dict() if merge_check else None,
            "language_model": getattr(model, "lm_description", ""), "device": str(torch_device),
            "num_recycles": recycles, "max_length": max_length, "batch_residues": batch_residues,
            "plddt": "per-residue Cα pLDDT, 0..100, written into every atom's B-factor",
            "ptm_head_trained": bool(cfg.loss.tm.weight),
            "n_records": len(records) + len(contents.bad), "n_predicted": len(predicted), "n_failed": len(failures),
            "n_not_reached": len(records) - len(predicted) - sum(f.id in {r.id for r in records} for f in failures),
            "seconds_total": time.perf_counter() - started,
            "predictions": predicted,
            "failures": [{"id": f.id, "line": f.line, "reason": f.reason} for f in failures],
        })

    try:
        if merge and has_adapters(model.esm) and batches:
            merge_check, merged = merge_adapter_checked(model, [r.sequence for r in batches[0]], torch_device,
                                                        recycles, merge_tolerance)
            done[0] = list(zip(batches[0], merged))  # the check's merged outputs are the first batch's results
            log.info("adapter merged: max deviation from unmerged %.2g Å (positions), %.2g (pLDDT) on %d "
                     "sequence(s)", merge_check.max_position_deviation, merge_check.max_plddt_deviation,
                     merge_check.n_sequences)
        for k, batch in enumerate(batches):
            bar.set_postfix(length=len(batch[-1]), batch=len(batch), refresh=False)
            results = done.pop(k) if k in done else _predict_or_split(model, batch, torch_device, recycles)
            for record, result in results:
                if isinstance(result, Prediction) and not result.finite:
                    result = "non-finite coordinates or pLDDT in the prediction"
                if isinstance(result, str):
                    failures.append(BadRecord(record.id, result, record.line))
                    continue
                stem = stems[record.id]
                pdb = result.to_pdb(remark=f"{record.id}; B-factors are pLDDT (0-100)")
                atomic_write(out_dir / f"{stem}.pdb", lambda tmp, text=pdb: Path(tmp).write_text(text))
                summaries[record.id] = _record_summary(record, result, stem, recycles)
                write_json_atomic(out_dir / f"{stem}.json", summaries[record.id])
            bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        write_summary("interrupted")
        raise
    bar.close()
    write_summary("completed")
    predicted = [summaries[r.id] for r in records if r.id in summaries]
    return PredictionRun(out_dir, summary_path, predicted, failures, merge_check)
