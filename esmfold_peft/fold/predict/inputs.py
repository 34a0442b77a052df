"""What a prediction takes in: sequences (multimers as chains joined by ':'), their model inputs with linkers,
batches by a token budget, shares of processes, file stems."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from ... import compat  # noqa: F401  (must precede openfold imports)
from ...data.fasta import CHAIN_SEPARATOR
from ...runtime.errors import UserError

from openfold.np import residue_constants  # noqa: E402

SUMMARY_FILE = "predictions.json"
MAX_STEM_LENGTH = 100
CHAIN_LINKER = "G" * 25  # esm-fold's multimer linker and residue index offset
RESIDUE_INDEX_OFFSET = 512
DEFAULT_MAX_TOKENS = 1024


class PredictionError(UserError):
    """Prediction cannot start (e.g. the device asked for is not available)."""


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
