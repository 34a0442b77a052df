"""Protein sequences from FASTA files, checked record by record before folding.

`read_fasta(path, max_length)` returns the usable records and, separately, every rejected record
with the reason, so one bad sequence never stops the others. Rules:

* a record starts at a line beginning with '>'; its id is the first whitespace-separated word of
  the header, its description the rest; sequence lines are joined, whitespace inside them is
  dropped, blank lines are ignored, lowercase letters are accepted (upper-cased), and one '*' at
  the very end (a stop codon) is dropped;
* accepted residues: the 20 standard amino acids and X (unknown);
* multimers: chains joined by ':' in one record (`A:B`, as fair-esm's esm-fold reads them), at most
  MAX_CHAINS of them (PDB chain ids A-Z); each chain is checked as a sequence of its own (one
  trailing '*' per chain is dropped), an empty chain rejects the record, and `max_length` counts
  the residues of all chains together (separators not counted);
* rewritten, with the count recorded on the record (`substitutions`): U (selenocysteine) -> C and
  O (pyrrolysine) -> K, their standard parents (as structure parsing maps modified residues to
  their parent); B (D or N), Z (E or Q) and J (I or L) -> X, since the model has no ambiguity codes;
* rejected (`FastaContents.bad`, the other records are still returned): an empty id, an empty
  sequence or chain, any other character (alignment gaps '-' and '.', digits, an inner '*', ...),
  more than `max_length` residues or MAX_CHAINS chains, and an id already used by an earlier
  record (the first one is kept);
* the whole file is refused with `FastaError` (the message names the file) when it is missing,
  unreadable or not text, holds no record, or has text before its first '>' (not FASTA).

Files ending in .gz are read through gzip.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from esmfold_peft.runtime.errors import UserError

STANDARD_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY")
UNKNOWN_RESIDUE = "X"
CHAIN_SEPARATOR = ":"
MAX_CHAINS = 26  # PDB chain ids A-Z
SUBSTITUTIONS = {"U": "C", "O": "K", "B": "X", "Z": "X", "J": "X"}
_SHOWN_PROBLEMS = 5  # invalid positions listed in a rejection message


class FastaError(UserError, ValueError):
    """A FASTA file that cannot be read at all; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class SequenceRecord:
    """One usable sequence: upper case, only the 20 standard residues and X.

    Attributes:
        id: first word of the header.
        description: the rest of the header ("" if none).
        sequence: the checked sequence, after the rewrites of the module docstring; chains of a
            multimer are joined by ':'.
        line: 1-based line number of the header in the file.
        substitutions: rewrite -> count, e.g. {"U->C": 1}; empty when the sequence was used as is.
    """

    id: str
    description: str
    sequence: str
    line: int
    substitutions: dict[str, int] = field(default_factory=dict)

    @property
    def chains(self) -> tuple[str, ...]:
        """The chains of a multimer (`sequence` split at ':'); one chain for a monomer."""
        return tuple(self.sequence.split(CHAIN_SEPARATOR))

    def __len__(self) -> int:
        """Residues of all chains (chain separators not counted)."""
        return len(self.sequence) - self.sequence.count(CHAIN_SEPARATOR)


@dataclass(frozen=True)
class BadRecord:
    """A rejected record: its id (or a placeholder naming its line) and why."""

    id: str
    reason: str
    line: int

    def __str__(self) -> str:
        return f"{self.id} (line {self.line}): {self.reason}"


@dataclass(frozen=True)
class FastaContents:
    """Usable records in file order, and rejected ones."""

    path: str
    records: list[SequenceRecord]
    bad: list[BadRecord]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FastaError(path, "file not found")
    if not path.is_file():
        raise FastaError(path, "not a file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise FastaError(path, f"cannot read: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FastaError(path, f"not a text file (byte {exc.start} is not UTF-8)") from exc
    if "\x00" in text:
        raise FastaError(path, "not a text file (it contains NUL bytes)")
    return text


def _split_records(path: Path, text: str) -> list[tuple[int, str, list[str]]]:
    """(header line number, header text after '>', sequence lines) for each record."""
    records: list[tuple[int, str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(">"):
            records.append((number, line[1:].strip(), []))
        elif not line.strip():
            continue
        elif not records:
            shown = line.strip()[:40]
            raise FastaError(path, f"not FASTA: line {number} comes before any '>' header ({shown!r})")
        else:
            records[-1][2].append(line)
    if not records:
        raise FastaError(path, "no FASTA records (no line starts with '>')")
    return records


def _check_chain(seq: str, where: str) -> str:
    """One chain's residues, upper case, its trailing stop dropped; ValueError says what is wrong."""
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise ValueError(f"empty {where}" if where == "sequence" else
                         f"empty {where} (chains are separated by '{CHAIN_SEPARATOR}')")
    invalid = [(i + 1, c) for i, c in enumerate(seq)
               if c not in STANDARD_RESIDUES and c != UNKNOWN_RESIDUE and c not in SUBSTITUTIONS]
    if invalid:
        of = "" if where == "sequence" else f" of {where}"
        shown = ", ".join(f"{c!r} at {i}{of}" for i, c in invalid[:_SHOWN_PROBLEMS])
        more = f" and {len(invalid) - _SHOWN_PROBLEMS} more" if len(invalid) > _SHOWN_PROBLEMS else ""
        raise ValueError(f"invalid character(s) in the sequence: {shown}{more} (allowed: the 20 standard "
                         f"amino acids and X, any case; U, O, B, Z, J are rewritten; '{CHAIN_SEPARATOR}' "
                         f"separates the chains of a multimer)")
    return seq


def check_sequence(raw: str, max_length: int | None = None) -> tuple[str, dict[str, int]]:
    """(sequence, substitutions) for one record's raw sequence text; ValueError says what is wrong.

    A multimer's chains (separated by ':') are checked one by one and joined by ':' again.
    """
    seq = "".join(raw.split())
    # upper-casing only ASCII: str.upper() maps some other letters onto amino-acid codes ('ſ' -> 'S', 'ß' -> 'SS')
    seq = "".join(c.upper() if c.isascii() else c for c in seq)
    parts = seq.split(CHAIN_SEPARATOR)
    if len(parts) > MAX_CHAINS:
        raise ValueError(f"{len(parts)} chains, more than the {MAX_CHAINS} a PDB file can name (A-Z)")
    if len(parts) == 1:
        chains = [_check_chain(parts[0], "sequence")]
    else:
        chains = [_check_chain(part, f"chain {n + 1}") for n, part in enumerate(parts)]
    n_residues = sum(len(c) for c in chains)
    if max_length is not None and n_residues > max_length:
        in_chains = f" in {len(chains)} chains" if len(chains) > 1 else ""
        raise ValueError(f"{n_residues} residues{in_chains}, more than the maximum of {max_length}")
    seq = CHAIN_SEPARATOR.join(chains)
    counts = Counter(c for c in seq if c in SUBSTITUTIONS)
    substitutions = {f"{c}->{SUBSTITUTIONS[c]}": n for c, n in sorted(counts.items())}
    for c, replacement in SUBSTITUTIONS.items():
        seq = seq.replace(c, replacement)
    return seq, substitutions


def read_fasta(path: str | Path, max_length: int | None = None) -> FastaContents:
    """Read and check every record of a FASTA file (rules in the module docstring).

    Args:
        path: a FASTA file, optionally gzipped (.gz).
        max_length: the longest sequence accepted, in residues; None for no limit.

    Raises FastaError for a file that cannot be used at all; problems with single records are
    returned in `bad` instead.
    """
    path = Path(path)
    records: list[SequenceRecord] = []
    bad: list[BadRecord] = []
    first_line: dict[str, int] = {}
    for line, header, seq_lines in _split_records(path, _read_text(path)):
        record_id = header.split(maxsplit=1)[0] if header else ""
        description = header[len(record_id):].strip()
        if not record_id:
            bad.append(BadRecord(f"<record at line {line}>", "empty id (nothing after '>')", line))
            continue
        if record_id in first_line:
            bad.append(BadRecord(record_id, f"duplicate id (first used at line {first_line[record_id]})", line))
            continue
        first_line[record_id] = line
        try:
            sequence, substitutions = check_sequence("".join(seq_lines), max_length)
        except ValueError as exc:
            bad.append(BadRecord(record_id, str(exc), line))
            continue
        records.append(SequenceRecord(record_id, description, sequence, line, substitutions))
    return FastaContents(str(path), records, bad)
