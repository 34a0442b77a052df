"""Structures from sequences, as fair-esm's esm-fold predicts them, with a trained run or ESMFold.

    run = predict_fasta("seqs.fasta", "runs/demo-lorta-r8", "predictions/")
    run = predict_fasta("seqs.fasta", None, "predictions/", esmfold="esmfold_3B_v1.pt", lm="esm2_t36_3B_UR50D.pt")

For each usable FASTA record (see `esmfold_peft.data.fasta` for what is accepted) it writes
`<stem>.pdb`, `<stem>.json` and `<stem>.pae.npz` into the output directory, and `predictions.json`
for the whole file. Conventions:

* PDB: chains A, B, ... (one per chain of an `A:B` record; a monomer is chain A), each chain's
  residues numbered from 1, every heavy atom the residue type has (atom37 from the structure
  module's atom14 positions, as ESMFold writes them). X residues are written as UNK with a Cα
  only, at the origin of the predicted backbone frame (the model places no other atom for them;
  for the 20 standard residues that origin is exactly the predicted Cα);
* B-factor column: each atom's own pLDDT (0..100) from the lDDT head, as esm-fold writes it (the
  head predicts all 37 atom slots, so atoms of one residue differ). `mean_plddt` in the JSON is the
  mean of the residues' Cα pLDDT, the channel the pLDDT-Cα loss trains and validation reports;
* multimers: the chains are joined by a 25-residue poly-G linker and each chain's residue index
  (with the linker after it) is raised by 512 per chain inside the model, exactly as esm-fold does
  (`encode_sequences`). Unlike esm-fold, the linker is removed from everything written (no linker
  residue in the PDB, its rows and columns cut from the PAE) and pTM is computed without it
  (openfold's `compute_tm` with the linker's residue weights set to 0); for a monomer that is the
  model's own pTM;
* `<stem>.pae.npz`: `pae`, the predicted aligned error in Å (float16 [L, L], row i = residue
  aligned on, column j = residue scored, L = residues without linkers), `chain_index` (int8 [L]) and
  `max_predicted_aligned_error` (the largest value the head can predict, also in the JSON);
* `<stem>` is the record id made filesystem-safe (`file_stems`);
* batches: records are sorted by length and packed while (sequences × longest length, linkers
  included) stays within the token budget (`max_tokens_per_batch`); shorter sequences are padded and
  masked, and results do not depend on the batching beyond float rounding. A batch that runs out
  of GPU memory is split in halves and retried, down to single sequences; a sequence that still
  does not fit is reported as failed;
* `chunk_size`: the trunk's triangular attention runs over chunks of this many rows (less memory,
  the same structure up to float rounding), as esm-fold's `--chunk-size`;
* several processes (`torchrun`, WORLD_SIZE > 1): the records are sorted by length and dealt out
  in turn (snake order, so each process gets a similar share of long ones); each process writes its
  records' files and a part summary (`.predictions.part-R-of-W.json`), and after a barrier rank 0
  merges them into the one `predictions.json` (the part files are then removed). The files of a
  record are the same as a single process writes;
* adapter: merged into the language model's weights for inference by default (the base model's
  cost), after checking on the first batch that merged outputs equal unmerged ones
  (`merge_adapter_checked`); a mismatch beyond the tolerance is an error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import compat  # noqa: F401  (must precede openfold imports)
from ..adapters import get_adapter_set, has_adapters
from ..atomic import atomic_write, write_json_atomic
from ..data.fasta import CHAIN_SEPARATOR, BadRecord, SequenceRecord, read_fasta
from ..runtime.errors import UserError
from ..runtime.progress import Progress
from ..runtime.rundir import ensure_writable_dir
from ..runtime.session import resolve_device, setup_distributed, teardown_distributed, world_size
from ..runtime.text import finite_or_none
from .checkpoint import load_trained_model
from .model import CA, predicted_atom37

from openfold.np import protein as of_protein  # noqa: E402
from openfold.np import residue_constants  # noqa: E402
from openfold.utils.loss import compute_tm  # noqa: E402

log = logging.getLogger(__name__)

SUMMARY_FILE = "predictions.json"
PART_FILE = ".predictions.part-{rank}-of-{world}.json"  # a leading '.': no record's stem can take it
PAE_SUFFIX = ".pae.npz"
MAX_STEM_LENGTH = 100
CHAIN_LINKER = "G" * 25  # esm-fold's multimer linker and residue index offset
RESIDUE_INDEX_OFFSET = 512
PAE_MAX_BIN = 31  # the pTM head's bins, as ESMFold and openfold use them
DEFAULT_MAX_TOKENS = 1024
# Merging changes float32 rounding in the LM (~1e-6), which the trunk and recycling amplify: on the
# demo model a 230-residue chain moved by 0.008 Å and 0.01 pLDDT points. A wrong merge moves atoms by Å.
DEFAULT_MERGE_TOLERANCE = 0.05


class PredictionError(UserError):
    """Prediction cannot start (e.g. the device asked for is not available)."""


class MergeMismatchError(PredictionError):
    """Merging the adapter into the language model changed the outputs beyond the tolerance."""


# --- inputs -------------------------------------------------------------------------------------

def model_length(sequence: str, chain_linker: str = CHAIN_LINKER) -> int:
    """Positions the model sees for a sequence (chains separated by ':'): residues plus linkers."""
    chains = sequence.split(CHAIN_SEPARATOR)
    return sum(len(c) for c in chains) + len(chain_linker) * (len(chains) - 1)


def encode_sequences(sequences: Sequence[str], chain_linker: str = CHAIN_LINKER,
                     residue_index_offset: int = RESIDUE_INDEX_OFFSET) -> dict[str, torch.Tensor]:
    """Model inputs for sequences (a multimer's chains separated by ':'), [B, L] padded to the longest.

    aatype (openfold order, X = 20), mask (1 on residues and linkers) and residue_index are what
    fair-esm's `batch_encode_sequences` makes: the chains joined by `chain_linker`, and chain i's
    residues, with the linker after them, numbered from i × `residue_index_offset` on. Also
    linker_mask (1 on the chains' own residues; 0 on linkers and padding) and chain_index (0, 1, …
    on each chain's residues; -1 on linkers and padding).
    """
    length = max(model_length(s, chain_linker) for s in sequences)
    aatype = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.float32)
    linker_mask = torch.zeros(len(sequences), length, dtype=torch.float32)
    chain_index = torch.full((len(sequences), length), -1, dtype=torch.long)
    residue_index = torch.arange(length).expand(len(sequences), length).clone()
    for i, seq in enumerate(sequences):
        start = 0
        for c, chain in enumerate(seq.split(CHAIN_SEPARATOR)):
            if c > 0:
                linker_start = start - len(chain_linker)
                aatype[i, linker_start:start] = torch.tensor(
                    [residue_constants.restype_order_with_x[a] for a in chain_linker], dtype=torch.long)
            end = start + len(chain)
            aatype[i, start:end] = torch.tensor([residue_constants.restype_order_with_x[a] for a in chain],
                                                dtype=torch.long)
            linker_mask[i, start:end] = 1.0
            chain_index[i, start:end] = c
            start = end + len(chain_linker)
        total = model_length(seq, chain_linker)
        start = 0
        for c, chain in enumerate(seq.split(CHAIN_SEPARATOR)):
            residue_index[i, start:min(start + len(chain) + len(chain_linker), total)] += c * residue_index_offset
            start += len(chain) + len(chain_linker)
        mask[i, :total] = 1.0
    return {"aatype": aatype, "mask": mask, "residue_index": residue_index, "linker_mask": linker_mask,
            "chain_index": chain_index}


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
    """One predicted structure, linkers removed (L = residues of all chains).

    Attributes:
        sequence: the sequence predicted (20 standard residues and X; a multimer's chains joined by ':').
        chain_index: int [L], 0 for the first chain's residues, 1 for the second's, ...
        atom_positions: float32 [L, 37, 3], Å.
        atom_mask: float32 [L, 37], 1 where the atom is written.
        atom_plddt: float32 [L, 37], each atom's pLDDT in 0..100 (the PDB's B-factors).
        plddt: float32 [L], per-residue (Cα) pLDDT in 0..100.
        ptm: predicted TM-score of the whole complex (linkers left out).
        pae: float32 [L, L], predicted aligned error in Å.
        max_pae: the largest value the aligned-error head can predict, Å.
        seconds: wall time of the batch's forward pass divided by its size (padded sequences cost
            the same, so this is each one's share).
        batch_size: sequences in the batch it was predicted in.
    """

    sequence: str
    chain_index: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    atom_plddt: np.ndarray
    plddt: np.ndarray
    ptm: float
    pae: np.ndarray
    max_pae: float
    seconds: float
    batch_size: int

    @property
    def chains(self) -> list[str]:
        return self.sequence.split(CHAIN_SEPARATOR)

    @property
    def mean_plddt(self) -> float:
        return float(self.plddt.mean())

    @property
    def residue_numbers(self) -> np.ndarray:
        """Each residue's number in its own chain, from 1."""
        return np.concatenate([np.arange(1, len(c) + 1) for c in self.chains])

    @property
    def finite(self) -> bool:
        """Coordinates of written atoms and their pLDDT are all finite."""
        written = self.atom_mask > 0
        return bool(np.isfinite(self.atom_positions[written]).all() and np.isfinite(self.atom_plddt[written]).all()
                    and np.isfinite(self.plddt).all())

    def to_pdb(self, remark: Optional[str] = None) -> str:
        """PDB text: chains A, B, …, each numbered from 1, per-atom pLDDT as B-factors (module docstring)."""
        residues = self.sequence.replace(CHAIN_SEPARATOR, "")
        aatype = np.array([residue_constants.restype_order_with_x[c] for c in residues])
        prot = of_protein.Protein(
            atom_positions=self.atom_positions, aatype=aatype, atom_mask=self.atom_mask,
            residue_index=self.residue_numbers, b_factors=np.clip(self.atom_plddt, 0.0, 100.0),
            chain_index=self.chain_index if len(self.chains) > 1 else None, remark=remark)
        return of_protein.to_pdb(prot)

    def pae_npz(self) -> bytes:
        """The `<stem>.pae.npz` file's bytes (module docstring)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, pae=self.pae.astype(np.float16), chain_index=self.chain_index.astype(np.int8),
                            max_predicted_aligned_error=np.float32(self.max_pae))
        return buffer.getvalue()


def linker_masked_ptm(logits: torch.Tensor, residue_weights: torch.Tensor) -> float:
    """pTM from [L, L, bins] pTM-head logits with openfold's `compute_tm`, residues weighted.

    Weights 0 leave positions (a multimer's linker) out of both the alignment and the scoring and
    out of the length that sets d0; NaN when the logits are not finite (compute_tm would raise).
    """
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float(compute_tm(logits, residue_weights=residue_weights.to(logits), max_bin=PAE_MAX_BIN,
                            no_bins=logits.shape[-1]))


@torch.no_grad()
def predict_sequences(model, sequences: Sequence[str], device: torch.device, num_recycles: int) -> list[Prediction]:
    """Predict a batch of sequences in one forward pass (the model must be in eval mode).

    A multimer (chains separated by ':') is predicted with its chains joined by the linker, which
    is then removed from the results (module docstring).
    """
    encoded = encode_sequences(sequences)
    batch = {k: encoded[k].to(device) for k in ("aatype", "mask", "residue_index")}
    start = time.perf_counter()
    out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=num_recycles)
    atoms = predicted_atom37(out, batch["mask"])
    positions, mask = (t.float().cpu().numpy() for t in atoms)
    atom_plddt = out["plddt"].float().cpu().numpy()
    pae = out["predicted_aligned_error"].float().cpu().numpy()
    max_pae = float(out["max_predicted_aligned_error"].float().max())
    keep = encoded["linker_mask"] > 0
    ptm = [linker_masked_ptm(out["ptm_logits"][i, :n, :n], encoded["linker_mask"][i, :n])
           for i, n in enumerate(model_length(s) for s in sequences)]
    seconds = (time.perf_counter() - start) / len(sequences)  # .cpu() waited for the device
    predictions = []
    for i, seq in enumerate(sequences):
        k = keep[i].numpy()
        predictions.append(Prediction(
            sequence=seq, chain_index=encoded["chain_index"][i][keep[i]].numpy(), atom_positions=positions[i, k],
            atom_mask=mask[i, k], atom_plddt=atom_plddt[i, k], plddt=atom_plddt[i, k, CA], ptm=ptm[i],
            pae=pae[i][np.ix_(k, k)], max_pae=max_pae, seconds=seconds, batch_size=len(sequences)))
    return predictions


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


def bf16_language_model(model) -> bool:
    return model.esm.embed_tokens.weight.dtype == torch.bfloat16


def adapted_parts(model) -> list:
    """The parts of the folding model that carry adapters: its language model and/or its trunk."""
    return [part for part in (model.esm, model.trunk) if has_adapters(part)]


def merge_adapter_checked(model, sequences: Sequence[str], device: torch.device, num_recycles: int,
                          tolerance: float = DEFAULT_MERGE_TOLERANCE) -> tuple[MergeCheck, list[Prediction]]:
    """Merge the active adapters (language model and trunk) into their weights, checking the outputs on `sequences`.

    Returns the check and the merged model's predictions of `sequences` (so they need not be run
    again). Raises MergeMismatchError, with the deviations, when merging changed the outputs by more
    than `tolerance` (the adapter is then unmerged again).
    """
    adapters = [get_adapter_set(part) for part in adapted_parts(model)]  # the LM's and/or the trunk's
    unmerged = predict_sequences(model, sequences, device, num_recycles)
    for aset in adapters:
        aset.merge()
    merged = predict_sequences(model, sequences, device, num_recycles)
    check = MergeCheck(
        max_position_deviation=max(_max_deviation(u.atom_positions[u.atom_mask > 0], m.atom_positions[m.atom_mask > 0])
                                   for u, m in zip(unmerged, merged)),
        max_plddt_deviation=max(_max_deviation(u.plddt, m.plddt) for u, m in zip(unmerged, merged)),
        tolerance=tolerance, n_sequences=len(sequences))
    if not check.ok:
        for aset in adapters:
            aset.unmerge()
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
        predicted: the per-record summaries (as in each `<stem>.json`), in FASTA order (under
            torchrun: of all processes, the same in each).
        failures: rejected FASTA records, then records whose prediction failed (in file order).
        merge_check: the merged-vs-unmerged check, or None when nothing was merged (under
            torchrun: the largest deviations over the processes' checks).
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
            record = records[0]
            linkers = model_length(record.sequence) - len(record)
            size = f"{len(record)} residues" + (f" (+{linkers} linker)" if linkers else "")
            return [(record, f"out of memory on {device} for {size}")]
        half = len(records) // 2
        return (_predict_or_split(model, records[:half], device, num_recycles)
                + _predict_or_split(model, records[half:], device, num_recycles))


def _record_summary(record: SequenceRecord, prediction: Prediction, stem: str, num_recycles: int) -> dict:
    return {"id": record.id, "description": record.description, "length": len(record),
            "n_chains": len(record.chains), "chain_lengths": [len(c) for c in record.chains],
            "mean_plddt": prediction.mean_plddt, "ptm": finite_or_none(prediction.ptm),
            "max_predicted_aligned_error": finite_or_none(prediction.max_pae), "seconds": prediction.seconds,
            "batch_size": prediction.batch_size, "num_recycles": num_recycles, "pdb": f"{stem}.pdb",
            "pae": f"{stem}{PAE_SUFFIX}", "substitutions": record.substitutions, "sequence": record.sequence}


def shard_records(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Indices into `lengths` for each of `world` processes, each list in input order.

    Sorted by length, longest first (equal lengths in input order), and dealt out in snake order
    (0, 1, …, W-1, W-1, …, 0, 0, 1, …) so that every process gets a similar share of long ones.
    """
    if world < 1:
        raise ValueError(f"the number of processes must be positive, got {world}")
    shards: list[list[int]] = [[] for _ in range(world)]
    for n, i in enumerate(sorted(range(len(lengths)), key=lambda k: -lengths[k])):
        turn, pos = divmod(n, world)
        shards[pos if turn % 2 == 0 else world - 1 - pos].append(i)
    return [sorted(shard) for shard in shards]


@dataclass
class _Loaded:
    """The model to predict with and what the summary says about where it came from."""

    model: torch.nn.Module
    source: dict
    adapter: str
    ptm_head_trained: bool
    default_recycles: int


def _load_model(run_dir, checkpoint, esmfold, lm, overrides: Sequence[str], device: torch.device) -> _Loaded:
    if esmfold is not None:
        if checkpoint is not None or overrides:
            raise PredictionError("--checkpoint and --set change a training run; they do not apply to --esmfold")
        try:
            from .pretrained import load_esmfold_checkpoint
        except ImportError as exc:
            raise PredictionError(f"ESMFold checkpoints cannot be loaded in this installation ({exc})") from exc
        # lm as text: the loader takes a path (fair-esm .pt, Hugging Face directory) or a fair-esm model name
        model, _ = load_esmfold_checkpoint(Path(esmfold), lm=None if lm is None else str(lm), device=str(device))
        return _Loaded(model, {"run_dir": None, "checkpoint": None, "overrides": [], "esmfold": str(esmfold),
                               "lm": None if lm is None else str(lm)}, "none", True,
                       # esm-fold's default: the trunk's max_recycles passes, i.e. one fewer recycle
                       int(model.trunk.cfg.max_recycles) - 1)
    if lm is not None:
        raise PredictionError("--lm goes with --esmfold; a run names its language model in its config "
                              "(change it with --set model.lm.path=…)")
    model, cfg = load_trained_model(Path(run_dir), Path(checkpoint) if checkpoint else None, overrides=overrides)
    return _Loaded(model, {"run_dir": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else None,
                           "overrides": list(overrides), "esmfold": None, "lm": None},
                   cfg.adapter.method, bool(cfg.loss.tm.weight), int(cfg.val.num_recycles))


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
                  progress: bool = True, overrides: Sequence[str] = ()) -> PredictionRun:
    """Predict every usable record of a FASTA file and write the files (module docstring).

    Args:
        fasta: FASTA file (optionally .gz); multimers as chains joined by ':'.
        run_dir: the training run directory (its config, exported model and adapter); None with `esmfold`.
        out_dir: output directory (created if needed; files of the same names are replaced).
        checkpoint: a training checkpoint to use instead of the run's exported model.
        esmfold: a fair-esm ESMFold checkpoint (e.g. esmfold_3B_v1.pt) to predict with instead of a run.
        lm: the ESM-2 for `esmfold` (its checkpoint does not hold the LM's weights): a fair-esm .pt, a
            Hugging Face ESM directory or a fair-esm model name; None takes the one its config names.
        num_recycles: trunk recycles; None takes the run's `val.num_recycles` (ESMFold: as esm-fold,
            the trunk's max_recycles passes).
        device: 'cpu', 'cuda', 'cuda:1', ...; None picks CUDA when available (under torchrun, each
            process's own GPU).
        max_length: most residues accepted per record (longer records are rejected); None for no limit.
        max_tokens_per_batch: token budget per batch (sequences × longest, linkers included).
        chunk_size: chunk the trunk's triangular attention (None: the model's setting, by default unchunked).
        merge: merge the adapter into the language model (checked on the first batch).
        merge_tolerance: largest deviation (Å, pLDDT points) accepted between merged and unmerged.
        progress: show a progress bar (rank 0 only under torchrun).
        overrides: `key=value` changes to the run's config, e.g. `model.lm.path=…` for a moved
            language model.

    `predictions.json` is always written, atomically, for what was done, also when interrupted.
    Raises FastaError (unusable FASTA file), CheckpointError and friends (unusable run or
    checkpoint), PredictionError (no usable device, contradictory arguments) and MergeMismatchError
    (merging changed the outputs). Problems with single records end up in `PredictionRun.failures`.
    """
    started = time.perf_counter()
    if (run_dir is None) == (esmfold is None):
        raise PredictionError("predict with either a training run or an ESMFold checkpoint (exactly one of them)")
    if num_recycles is not None and num_recycles < 0:
        raise PredictionError(f"num_recycles must be >= 0, got {num_recycles}")
    if chunk_size is not None and chunk_size < 1:
        raise PredictionError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_tokens_per_batch < 1:
        raise PredictionError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    contents = read_fasta(fasta, max_length=max_length)
    world = world_size()
    own_group = False
    if world > 1:
        own_group = not dist.is_initialized()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        _, torch_device = setup_distributed(f"cuda:{local_rank}" if device == "cuda" else device)
        rank = dist.get_rank()
    else:
        torch_device, rank = resolve_device(device), 0
    finished = False
    try:
        run = _predict(contents, fasta, run_dir, out_dir, checkpoint=checkpoint, esmfold=esmfold, lm=lm,
                       num_recycles=num_recycles, torch_device=torch_device, rank=rank, world=world,
                       max_length=max_length, max_tokens_per_batch=max_tokens_per_batch, chunk_size=chunk_size,
                       merge=merge, merge_tolerance=merge_tolerance, progress=progress, overrides=overrides,
                       started=started)
        finished = True
        return run
    finally:
        if own_group:
            teardown_distributed(synchronize=finished)


class PredictionWriter:
    """What one process writes: each record's files (PDB, PAE, JSON), its share of predictions.json, and on
    rank 0 under torchrun the merged predictions.json of every process's share."""

    def __init__(self, out_dir: Path, fasta, contents, mine: list, loaded: "_Loaded", settings: dict,
                 rank: int, world: int, device, started: float):
        self.out_dir, self.fasta, self.contents, self.mine, self.loaded = out_dir, fasta, contents, mine, loaded
        self.settings, self.rank, self.world, self.device, self.started = settings, rank, world, device, started
        self.order = {r.id: i for i, r in enumerate(contents.records)}
        self.stems = dict(zip((r.id for r in contents.records), file_stems([r.id for r in contents.records])))
        self.summaries: dict[str, dict] = {}
        self.failed: list[BadRecord] = []  # records whose prediction failed (FASTA rejections: contents.bad)
        self.merge_check: Optional[MergeCheck] = None
        if world > 1:  # a part left by an earlier, interrupted run must not be merged into this one
            _part_path(out_dir, rank, world).unlink(missing_ok=True)

    def write(self, record, result) -> None:
        """One record's outcome: its files, or its failure."""
        if isinstance(result, Prediction) and not result.finite:
            result = "non-finite coordinates or pLDDT in the prediction"
        if isinstance(result, str):
            self.failed.append(BadRecord(record.id, result, record.line))
            return
        stem, out = self.stems[record.id], self.out_dir
        pdb = result.to_pdb(remark=f"{record.id}; B-factors are per-atom pLDDT (0-100)")
        atomic_write(out / f"{stem}.pdb", lambda tmp: Path(tmp).write_text(pdb))
        atomic_write(out / f"{stem}{PAE_SUFFIX}", lambda tmp, data=result.pae_npz(): Path(tmp).write_bytes(data))
        self.summaries[record.id] = _record_summary(record, result, stem, self.settings["num_recycles"])
        write_json_atomic(out / f"{stem}.json", self.summaries[record.id])

    def part(self, status: str) -> dict:
        """This process's share of predictions.json."""
        return {"rank": self.rank, "status": status, "device": str(self.device),
                "merge_check": self.merge_check.as_dict() if self.merge_check else None,
                "predictions": [self.summaries[r.id] for r in self.mine if r.id in self.summaries],
                "failures": [{"id": f.id, "line": f.line, "reason": f.reason} for f in self.failed]}

    def summary(self, parts: list[dict]) -> dict:
        """predictions.json from the processes' parts."""
        records, bad, model = self.contents.records, self.contents.bad, self.loaded.model
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
                         "ptm": "without the linker", "residue_numbering": "each chain from 1"},
            "plddt": "per-atom pLDDT, 0..100, in each atom's B-factor; mean_plddt: mean of the residues' Cα pLDDT",
            "pae": f"<stem>{PAE_SUFFIX}: 'pae', predicted aligned error in Å, float16 [L, L], linkers removed",
            "ptm_head_trained": self.loaded.ptm_head_trained,
            "n_records": len(records) + len(bad), "n_predicted": len(predicted),
            "n_failed": len(bad) + len(prediction_failures),
            "n_not_reached": len(records) - len(predicted) - len(prediction_failures),
            "seconds_total": time.perf_counter() - self.started,
            "predictions": predicted,
            "failures": [{"id": f.id, "line": f.line, "reason": f.reason} for f in bad] + prediction_failures,
        }

    def finish(self, status: str) -> dict:
        """Write predictions.json (under torchrun rank 0 merges the processes' parts) and return it."""
        out, rank, world = self.out_dir, self.rank, self.world
        if world == 1:
            merged = self.summary([self.part(status)])
            write_json_atomic(out / SUMMARY_FILE, merged)
            return merged
        write_json_atomic(_part_path(out, rank, world), self.part(status))
        if status != "completed":  # no barrier: the others may be gone; rank 0 merges what is there
            if rank == 0:
                write_json_atomic(out / SUMMARY_FILE, self.summary(_read_parts(out, world)))
            return {}
        dist.barrier()
        merged = self.summary(_read_parts(out, world))
        if rank == 0:
            write_json_atomic(out / SUMMARY_FILE, merged)
        dist.barrier()  # every process has read the parts, and predictions.json exists
        if rank == 0:
            for r in range(world):
                _part_path(out, r, world).unlink(missing_ok=True)
        return merged


def _predict(contents, fasta, run_dir, out_dir, *, checkpoint, esmfold, lm, num_recycles, torch_device, rank,
             world, max_length, max_tokens_per_batch, chunk_size, merge, merge_tolerance, progress, overrides,
             started) -> PredictionRun:
    if rank == 0:
        for bad in contents.bad:
            log.warning("skipping FASTA record %s", bad)
    out_dir = ensure_writable_dir(Path(out_dir))
    loaded = _load_model(run_dir, checkpoint, esmfold, lm, overrides, torch_device)
    model = loaded.model
    model.to(torch_device).eval()
    if chunk_size is not None:
        model.trunk.set_chunk_size(chunk_size)
    recycles = int(loaded.default_recycles if num_recycles is None else num_recycles)
    records = contents.records
    mine = ([records[i] for i in shard_records([model_length(r.sequence) for r in records], world)[rank]]
            if world > 1 else records)
    batches = [[mine[i] for i in batch]
               for batch in length_batches([model_length(r.sequence) for r in mine], max_tokens_per_batch)]
    writer = PredictionWriter(out_dir, fasta, contents, mine, loaded, {
        "num_recycles": recycles, "max_length": max_length, "max_tokens_per_batch": max_tokens_per_batch},
        rank, world, torch_device, started)
    bar = Progress(len(mine), "predicting", enabled=progress and rank == 0, unit="seq")
    try:
        done = {}
        if merge and bf16_language_model(model):  # merged weights would be rounded to bf16: keep hooks
            log.info("the language model is stored in bf16: adapters are applied unmerged")
            merge = False
        if merge and adapted_parts(model) and batches:
            writer.merge_check, merged = merge_adapter_checked(model, [r.sequence for r in batches[0]], torch_device,
                                                               recycles, merge_tolerance)
            done[0] = list(zip(batches[0], merged))  # the check's merged outputs are the first batch's results
            c = writer.merge_check
            log.info("adapter merged: max deviation from unmerged %.2g Å (positions), %.2g (pLDDT) on %d "
                     "sequence(s)", c.max_position_deviation, c.max_plddt_deviation, c.n_sequences)
        for k, batch in enumerate(batches):
            for record, result in done.pop(k) if k in done else _predict_or_split(model, batch, torch_device,
                                                                                  recycles):
                writer.write(record, result)
            bar.update(len(batch), length=model_length(batch[-1].sequence), batch=len(batch))
    except KeyboardInterrupt:
        bar.close()
        writer.finish("interrupted")
        raise
    bar.close()
    merged = writer.finish("completed")
    failures = list(contents.bad) + [BadRecord(f["id"], f["reason"], f["line"])
                                     for f in merged["failures"][len(contents.bad):]]
    return PredictionRun(out_dir, out_dir / SUMMARY_FILE, merged["predictions"], failures,
                         _check_from_dict(merged["merge_check"]))


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
