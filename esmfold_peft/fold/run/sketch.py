"""A sketch of a run's training sequences (their k-mers), stored with its adapter, for routing (`--adapter auto`).

`sketch.json` beside `adapter_config.json` holds the hashed k-mers (k = 4 by default) of the training
chains: every distinct one while there are at most `MAX_HASHES`, else the smallest `MAX_HASHES`
hashes (a bottom sketch: then only the query k-mers whose hash falls in that range are counted). A
query's score against a sketch is its k-mers' containment: the fraction of the query's distinct
(counted) k-mers that occur among the training sequences' (0 to 1). Unrelated proteins share few
4-mers (20⁴ = 160,000 are possible), variants of one family many.

The hash is the first 8 bytes of BLAKE2b of the k-mer, the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ...atomic import write_json_atomic
from ...runtime.errors import ArtifactError

SKETCH_FILE = "sketch.json"
SKETCH_FORMAT = 1
DEFAULT_K = 4
MAX_HASHES = 200_000


def kmer_hash(kmer: str) -> int:
    return int.from_bytes(hashlib.blake2b(kmer.encode(), digest_size=8).digest(), "big")


def kmer_hashes(sequence: str, k: int) -> set[int]:
    """The hashes of the distinct k-mers of `sequence` (a multimer's chains separately: no k-mer spans ':')."""
    out = set()
    for chain in sequence.split(":"):
        out.update(kmer_hash(chain[i:i + k]) for i in range(len(chain) - k + 1))
    return out


@dataclass(frozen=True)
class Sketch:
    k: int
    hashes: frozenset
    n_sequences: int
    max_hash: Optional[int] = None  # a bottom sketch counts only hashes <= max_hash; None: complete

    @classmethod
    def of(cls, sequences: Iterable[str], k: int = DEFAULT_K, limit: int = MAX_HASHES) -> "Sketch":
        hashes, n = set(), 0
        for seq in sequences:
            hashes |= kmer_hashes(seq, k)
            n += 1
        if len(hashes) <= limit:
            return cls(k, frozenset(hashes), n)
        kept = sorted(hashes)[:limit]
        return cls(k, frozenset(kept), n, kept[-1])

    def score(self, sequence: str) -> float:
        """Containment of the query's (counted) k-mers in the training k-mers, 0 to 1 (0 for a query shorter than k)."""
        return self.containment(kmer_hashes(sequence, self.k))

    def containment(self, query: set) -> float:
        """`score` from the query's k-mer hashes (`kmer_hashes(sequence, self.k)`), for one query against many."""
        if self.max_hash is not None:
            query = {h for h in query if h <= self.max_hash}
        return len(query & self.hashes) / len(query) if query else 0.0

    def to_dict(self) -> dict:
        return {"format": SKETCH_FORMAT, "what": "hashed k-mers of the run's training sequences (routing)",
                "k": self.k, "n_sequences": self.n_sequences, "max_hash": self.max_hash,
                "hashes": sorted(self.hashes)}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SKETCH_FILE
        write_json_atomic(path, self.to_dict())
        return path


def read_sketch(directory: Path) -> Optional[Sketch]:
    """The sketch saved in `directory` (None when there is none); a damaged one is an ArtifactError."""
    path = Path(directory) / SKETCH_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != SKETCH_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {SKETCH_FORMAT}")
        k, n, top, hashes = int(data["k"]), int(data["n_sequences"]), data["max_hash"], data["hashes"]
        if k < 1 or not isinstance(hashes, list) or not all(isinstance(h, int) for h in hashes):
            raise ValueError("k must be positive and hashes a list of integers")
        return Sketch(k, frozenset(hashes), n, None if top is None else int(top))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(path, f"damaged routing sketch ({exc})") from None
