"""Memory and time of a prediction batch, estimated before it starts.

Inference keeps no activations for backward, so a prediction's peak is the model's own bytes plus the
largest transient of one phase (the trunk, the structure module and heads, or the language model). The
transients scale with the model's shapes, and their constants were fitted to BENCHMARKS.md section 6
(`make bench-memory`: paper_d4, 256-1,024 residues, with and without chunking; tensor bytes measured
by a tracker of live tensor storage):

* trunk: `TRI_SCORE_COPIES` × the triangular attention's scores (pair heads × rows × L² floats, rows =
  the chunk size, or L unchunked) + `TRUNK_PAIR_COPIES` × the pair representation (L² × c_z floats);
* structure module and heads: `HEADS_PAIR_COPIES` × the pair representation (its outputs, the
  distogram, pTM and PAE logits are all L² × 64 or so);
* language model: `LM_SCORE_COPIES` × one layer's attention probabilities (heads × L² floats; none
  with SDPA) + two copies of the stacked per-layer representations ((layers + 1) × L × d floats).

Batched records multiply the transient by their number; a recycle keeps one more pair representation.
The check `tests/test_predict_estimate.py` holds the estimate to within `STATED_FACTOR` of every
measured cell of section 6. Process overhead (libraries, allocator caches: about 0.4-0.5 GiB of RSS on
CPU) is not included; on CUDA the caching allocator may hold more than the live tensors.

Time is estimated from the job itself: the trunk's cost grows as L³ + `COST_L2_WEIGHT` × L² (fitted to
the per-block seconds of the same benchmark), so a batch's seconds ≈ its cost × the seconds per unit of
cost the job's earlier batches took. Before any batch has run there is no time estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch

TRI_SCORE_COPIES = 2.0   # section 6: 256/512 residues, chunked and not (fitted: 2.0 ± 0.05)
TRUNK_PAIR_COPIES = 8.7  # section 6 (fitted: 8.7 ± 0.1)
HEADS_PAIR_COPIES = 7.9  # section 6: 7.6-7.9 at 256-1,024 residues (the largest taken)
LM_SCORE_COPIES = 3.0    # scores, softmax, probabilities times values (fair-esm's attention)
RECYCLE_PAIR_COPIES = 1.0
COST_L2_WEIGHT = 830.0   # section 6's block seconds: 7.4 s at 256, 36.6 s at 512 residues
STATED_FACTOR = 1.5      # the estimate is within this factor of every measured cell (tested)
LONG_RECORD = 400        # residues from which a batch's estimate is logged before it starts
CHUNK_CHOICES = (128, 64, 32, 16, 8, 4)
FLOAT = 4                # bytes: the trunk runs in float32
GiB = 1024 ** 3


@dataclass(frozen=True)
class FoldShape:
    """The shapes a prediction's transient memory follows."""

    c_z: int
    pair_heads: int
    lm_layers: int
    lm_heads: int
    lm_dim: int
    lm_sdpa: bool

    @classmethod
    def of(cls, model) -> "FoldShape":
        cfg = model.trunk.cfg
        lm = model.esm
        return cls(int(cfg.pairwise_state_dim), int(cfg.pairwise_state_dim) // int(cfg.pairwise_head_width),
                   int(lm.num_layers), int(lm.attention_heads), int(lm.embed_dim), _uses_sdpa(lm))


def _uses_sdpa(lm) -> bool:
    from ..model.esm_attention import sdpa_forward

    return any(isinstance(m.forward, partial) and m.forward.func is sdpa_forward for m in lm.modules()
               if "forward" in vars(m))


@dataclass(frozen=True)
class Estimate:
    """A batch's estimated memory (bytes) and, when the job has a rate, time (seconds)."""

    length: int
    batch: int
    chunk_size: Optional[int]
    resident: int
    phases: dict  # phase -> transient bytes
    available: Optional[int] = None
    seconds: Optional[float] = None

    @property
    def transient(self) -> int:
        return max(self.phases.values())

    @property
    def peak(self) -> int:
        return self.resident + self.transient

    @property
    def fits(self) -> bool:
        return self.available is None or self.transient <= self.available

    def line(self) -> str:
        where = max(self.phases, key=self.phases.get)
        avail = f", {self.available / GiB:.1f} GiB available" if self.available is not None else ""
        time = f"; about {self.seconds:.0f} s at this job's rate so far" if self.seconds is not None else \
            "; no time estimate before a first batch has run"
        return (f"estimated peak memory {self.peak / GiB:.2f} GiB (model {self.resident / GiB:.2f} + "
                f"{self.transient / GiB:.2f} in the {where}{avail}){time}")


def transient_bytes(shape: FoldShape, length: int, batch: int = 1, chunk_size: Optional[int] = None,
                    recycles: int = 0) -> dict:
    """Per phase, the estimated bytes a prediction allocates beyond the model (module docstring)."""
    L = int(length)
    rows = min(L, chunk_size) if chunk_size else L
    pair = L * L * shape.c_z * FLOAT
    scores = shape.pair_heads * rows * L * L * FLOAT
    keep = RECYCLE_PAIR_COPIES * pair if recycles > 0 else 0
    lm_scores = 0 if shape.lm_sdpa else LM_SCORE_COPIES * shape.lm_heads * (L + 2) ** 2 * FLOAT
    lm = lm_scores + 2 * (shape.lm_layers + 1) * (L + 2) * shape.lm_dim * FLOAT
    return {"trunk": int(batch * (TRI_SCORE_COPIES * scores + TRUNK_PAIR_COPIES * pair + keep)),
            "structure module and heads": int(batch * (HEADS_PAIR_COPIES * pair + keep)),
            "language model": int(batch * lm)}


def resident_bytes(model, device: Optional[torch.device] = None) -> int:
    """The model's parameter and buffer bytes (on `device`'s type only, when given: an offloaded LM is not)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if device is None or t.device.type == torch.device(device).type)


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device` now: CUDA's free bytes, or the machine's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def trunk_cost(length: int) -> float:
    """The trunk's relative cost at `length` residues (module docstring); a batch's is the sum."""
    return float(length) ** 3 + COST_L2_WEIGHT * float(length) ** 2


def estimate_batch(model, length: int, batch: int = 1, chunk_size: Optional[int] = None, recycles: int = 0,
                   available: Optional[int] = None, seconds_per_cost: Optional[float] = None,
                   device: Optional[torch.device] = None) -> Estimate:
    phases = transient_bytes(FoldShape.of(model), length, batch, chunk_size, recycles)
    seconds = None if seconds_per_cost is None else seconds_per_cost * batch * trunk_cost(length) * (1 + recycles)
    return Estimate(int(length), int(batch), chunk_size, resident_bytes(model, device), phases, available, seconds)


def fitting_chunk_size(model, length: int, batch: int, recycles: int, available: int,
                       choices: Sequence[int] = CHUNK_CHOICES) -> Optional[int]:
    """The largest trunk chunk size whose estimate fits in `available` bytes (None: none does)."""
    shape = FoldShape.of(model)
    for chunk in choices:
        if max(transient_bytes(shape, length, batch, chunk, recycles).values()) <= available:
            return chunk
    return None


class BatchEstimator:
    """Logs the estimate before each long batch of a job, learning the job's rate from the batches it ran."""

    def __init__(self, model, device: torch.device, recycles: int, log, long_record: Optional[int] = None):
        self.model, self.device, self.recycles, self.log = model, device, recycles, log
        self.long_record = long_record
        self.cost_done = 0.0
        self.seconds_done = 0.0

    def before(self, lengths: Sequence[int]) -> Optional[Estimate]:
        """Log (and return) the estimate for a batch of records of these model lengths, if it is long."""
        length, batch = max(lengths), len(lengths)
        if length < (self.long_record or LONG_RECORD):
            return None
        rate = self.seconds_done / self.cost_done if self.cost_done > 0 else None
        chunk = getattr(self.model.trunk, "chunk_size", None)
        est = estimate_batch(self.model, length, batch, chunk, self.recycles, available_bytes(self.device), rate,
                             self.device)
        what = f"{batch} record(s) of {length} residues" if batch > 1 else f"a record of {length} residues"
        if est.fits:
            self.log.info("%s: %s", what, est.line())
            return est
        fit = fitting_chunk_size(self.model, length, batch, self.recycles, est.available,
                                 [c for c in CHUNK_CHOICES if chunk is None or c < chunk])
        if fit is None:
            advice = "no --chunk-size fits by the estimate: use a larger device, or --max-length to skip it"
        else:
            chunked = estimate_batch(self.model, length, batch, fit, self.recycles, device=self.device)
            advice = f"--chunk-size {fit} should fit (estimated peak {chunked.peak / GiB:.2f} GiB)"
        self.log.warning("%s: %s, more than is available; %s", what, est.line(), advice)
        return est

    def after(self, lengths: Sequence[int], seconds: float) -> None:
        """Count a batch that took `seconds` (its records are padded to the longest, as `before` assumes)."""
        self.cost_done += len(lengths) * trunk_cost(max(lengths)) * (1 + self.recycles)
        self.seconds_done += seconds
