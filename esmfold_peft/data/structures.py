"""Structure files in, per-chain arrays out: PDB / mmCIF (optionally gzipped) parsed with Biopython.

Every chain comes out in OpenFold's atom37 layout (`openfold.np.residue_constants.atom_types`), so
the feature step can hand it to `openfold.data.data_transforms` unchanged. Only the first model is
read. Rules for the awkward parts of real files:

* selenomethionine (MSE) becomes methionine, its SE atom becomes SD;
* alternate locations: the highest-occupancy one wins (the first one on a tie), for atoms and for
  whole residues (point mutations modelled as two residue names at one position);
* insertion codes: the residue is kept and its code recorded;
* hetero groups: waters and ligands are dropped; modified amino acids become their parent when
  Biopython's `protein_letters_3to1_extended` knows them, otherwise 'X' if they have an N-CA-C
  backbone; unknown residue names with an N-CA-C backbone (UNK, ...) become 'X';
* missing atoms keep mask 0; chains without any amino acid (DNA, RNA, ligand-only) are skipped;
* a chain with no Cα at all or with non-finite coordinates is still returned: `chain_fault` names
  what makes it unusable, and the cache and the evaluation skip it with that reason.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from Bio.Data.PDBData import protein_letters_3to1_extended
from Bio.PDB import MMCIFParser, PDBParser

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from esmfold_peft.runtime.errors import UserError
from openfold.np import residue_constants as rc

log = logging.getLogger(__name__)

# suffix (after an optional .gz) -> parser
STRUCTURE_FORMATS = {".pdb": "pdb", ".ent": "pdb", ".cif": "mmcif", ".mmcif": "mmcif"}

# Biopython fills this date in when a PDB file has no HEADER record.
_BIOPYTHON_PLACEHOLDER_DATE = "1909-01-08"

_MMCIF_RESOLUTION_KEYS = (
    "_refine.ls_d_res_high",
    "_reflns.d_resolution_high",
    "_em_3d_reconstruction.resolution",
)
_MMCIF_DATE_KEYS = (
    "_pdbx_audit_revision_history.revision_date",  # first entry = initial release
    "_pdbx_database_status.recvd_initial_deposition_date",
)


@dataclass(eq=False)
class Chain:
    """One protein chain in atom37 layout; per-residue arrays share the length L."""

    name: str  # file stem + "_" + chain id, e.g. "1abc_A"
    chain_id: str
    sequence: str  # one-letter, 'X' for unknown
    aatype: np.ndarray  # int64 [L], restype_order_with_x (X = 20)
    atom37_positions: np.ndarray  # float32 [L, 37, 3]
    atom37_mask: np.ndarray  # float32 [L, 37]
    b_factors: np.ndarray  # float32 [L, 37] (pLDDT in predicted models)
    residue_index: np.ndarray  # int64 [L], author residue numbers
    insertion_codes: list[str]  # "" where none
    resolution: float  # Å, nan if unknown
    release_date: str | None  # ISO yyyy-mm-dd
    source: str  # path of the file it came from

    def __len__(self) -> int:
        return len(self.sequence)


class StructureError(UserError):
    """A structure file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def structure_format(path: str | Path) -> str:
    """'pdb' or 'mmcif' from the file name (.pdb, .ent, .cif, .mmcif, each optionally .gz)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = STRUCTURE_FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise StructureError(path, f"unknown structure format (expected one of "
                                   f"{', '.join(STRUCTURE_FORMATS)}, optionally .gz)")
    return fmt


def is_structure_file(path: str | Path) -> bool:
    """True if the name has a structure suffix this module reads."""
    try:
        structure_format(path)
    except StructureError:
        return False
    return True


def file_stem(path: str | Path) -> str:
    """The file name without .gz and without the format suffix: '1abc.cif.gz' -> '1abc'."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem


def chain_name(path: str | Path, chain_id: str) -> str:
    """'1abc_A' for chain A of 1abc.cif; the stem alone when the chain id is blank."""
    chain_id = chain_id.strip()
    return f"{file_stem(path)}_{chain_id}" if chain_id else file_stem(path)


def chain_fault(chain: Chain) -> str | None:
    """Why a parsed chain cannot be trained on or scored (no residues, no Cα, non-finite atoms), or None.

    Parsing keeps such chains (one bad chain should not cost a file its others); the cache and the
    evaluation ask this before they use one.
    """
    if len(chain) == 0:
        return "no residues"
    present = chain.atom37_mask > 0
    if not present[:, rc.atom_order["CA"]].any():
        return "no Cα atom in any residue"
    bad = present & ~np.isfinite(chain.atom37_positions).all(axis=-1)
    if bad.any():
        residue, atom = np.argwhere(bad)[0]
        label = f"{chain.residue_index[residue]}{chain.insertion_codes[residue]}"
        return (f"non-finite coordinates in {int(bad.sum())} atom(s), the first at residue {label} "
                f"atom {rc.atom_types[atom]}")
    return None


def parse_structure(path: str | Path, chains: Sequence[str] | None = None) -> list[Chain]:
    """All protein chains of the first model (or only `chains`, by author chain id, in file order).

    Raises StructureError if the file is empty, unreadable, not parseable, has no protein chain,
    or lacks a requested chain.
    """
    path = Path(path)
    fmt = structure_format(path)
    text = _read_text(path)
    if not text.strip():
        raise StructureError(path, "empty file")
    model, (resolution, release_date) = _first_model(text, fmt, path)

    found: list[Chain] = []
    for bio_chain in model:
        if chains is not None and bio_chain.id not in chains:
            continue
        chain = _chain_from_biopython(bio_chain, path, resolution, release_date)
        if chain is not None:
            found.append(chain)

    if chains is not None:
        missing = [c for c in chains if c not in {ch.chain_id for ch in found}]
        if missing:
            present = ", ".join(repr(c.id) for c in model) or "none"
            raise StructureError(path, f"no protein chain {', '.join(map(repr, missing))} "
                                       f"in the first model (chains there: {present})")
    if not found:
        raise StructureError(path, "no protein chain (no amino-acid residue in the first model)")
    return found


def iter_structures(paths: Iterable[str | Path],
                    errors: list[tuple[str, str]] | None = None) -> Iterator[Chain]:
    """Chains of many files; a bad file is logged, appended to `errors` as (path, reason), skipped."""
    for path in paths:
        try:
            chains = parse_structure(path)
        except StructureError as exc:
            log.warning("skipping %s", exc)
            if errors is not None:
                errors.append((exc.path, exc.reason))
            continue
        yield from chains


# --- reading -------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise StructureError(path, "file not found") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise StructureError(path, f"cannot read file: {exc}") from None


def _first_model(text: str, fmt: str, path: Path):
    """(first Biopython model, (resolution, release_date)) or StructureError."""
    try:
        if fmt == "pdb":
            structure = PDBParser(QUIET=True).get_structure(file_stem(path), io.StringIO(text))
            header = _pdb_header(structure.header)
        else:
            parser = MMCIFParser(QUIET=True)
            structure = parser.get_structure(file_stem(path), io.StringIO(text))
            header = _mmcif_header(parser._mmcif_dict)
    except Exception as exc:  # Biopython raises many types (ValueError, KeyError, PDBConstructionException, ...)
        raise StructureError(path, f"not parseable as {fmt.upper()}: {type(exc).__name__}: {exc}") from None
    models = list(structure)
    if not models:
        raise StructureError(path, f"no atoms found (not a {fmt.upper()} file?)")
    return models[0], header


def _pdb_header(header: dict) -> tuple[float, str | None]:
    resolution = header.get("resolution")
    date = header.get("release_date") or header.get("deposition_date")
    if date == _BIOPYTHON_PLACEHOLDER_DATE:
        date = None
    return (float(resolution) if resolution is not None else math.nan), date


def _mmcif_header(mmcif: dict) -> tuple[float, str | None]:
    resolution = math.nan
    for key in _MMCIF_RESOLUTION_KEYS:
        value = _mmcif_first(mmcif, key)
        if value is not None:
            try:
                resolution = float(value)
                break
            except ValueError:
                continue
    date = next((v for v in (_mmcif_first(mmcif, k) for k in _MMCIF_DATE_KEYS) if v), None)
    return resolution, date


def _mmcif_first(mmcif: dict, key: str) -> str | None:
    """First value of an mmCIF item; None when absent or '?' / '.' (mmCIF's unknown / n.a.)."""
    values = mmcif.get(key)  # MMCIF2Dict maps every item to a list of strings
    if not values:
        return None
    return None if values[0] in ("?", ".") else values[0]


# --- residues and atoms --------------------------------------------------------------------------

def _chain_from_biopython(bio_chain, path: Path, resolution: float,
                          release_date: str | None) -> Chain | None:
    """Atom37 arrays of one Biopython chain, or None if it has no amino acid."""
    letters, positions, masks, bfactors, numbers, icodes = [], [], [], [], [], []
    for residue in bio_chain:
        residue = _best_residue(residue)
        letter = residue_letter(residue)
        if letter is None:
            continue
        pos, mask, bfac = _residue_atoms(residue)
        letters.append(letter)
        positions.append(pos)
        masks.append(mask)
        bfactors.append(bfac)
        numbers.append(residue.id[1])
        icodes.append(residue.id[2].strip())
    if not letters:
        return None
    sequence = "".join(letters)
    return Chain(
        name=chain_name(path, bio_chain.id),
        chain_id=bio_chain.id,
        sequence=sequence,
        aatype=np.array([rc.restype_order_with_x[a] for a in sequence], dtype=np.int64),
        atom37_positions=np.stack(positions).astype(np.float32),
        atom37_mask=np.stack(masks).astype(np.float32),
        b_factors=np.stack(bfactors).astype(np.float32),
        residue_index=np.array(numbers, dtype=np.int64),
        insertion_codes=icodes,
        resolution=resolution,
        release_date=release_date,
        source=str(path),
    )


def residue_letter(residue) -> str | None:
    """One-letter code of an amino-acid residue ('X' if unknown); None for water, ligands, nucleotides."""
    if residue.id[0] == "W":
        return None
    letter = protein_letters_3to1_extended.get(residue.get_resname().strip().upper())
    if letter is not None:
        return letter if letter in rc.restype_order else "X"
    # a residue name nobody maps, with a peptide backbone: an unknown or unusual amino acid
    if all(name in residue for name in ("N", "CA", "C")):
        return "X"
    return None


def _best_residue(residue):
    """The highest-occupancy residue where one position holds two residue names (point mutation)."""
    if residue.is_disordered() == 2:
        return max(residue.disordered_get_list(), key=_mean_occupancy)
    return residue


def _mean_occupancy(residue) -> float:
    occupancies = [_best_atom(a).get_occupancy() or 0.0 for a in residue]
    return sum(occupancies) / max(len(occupancies), 1)


def _best_atom(atom):
    """The highest-occupancy alternate location of an atom (the first one on a tie)."""
    if atom.is_disordered():
        return max(atom.disordered_get_list(), key=lambda a: a.get_occupancy() or 0.0)
    return atom


def _residue_atoms(residue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions [37,3], mask [37], b-factors [37]); atoms outside atom37 (H, ...) are ignored."""
    pos = np.zeros((rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((rc.atom_type_num,), dtype=np.float32)
    bfac = np.zeros((rc.atom_type_num,), dtype=np.float32)
    is_mse = residue.get_resname().strip().upper() == "MSE"
    for atom in residue:
        atom = _best_atom(atom)
        name = atom.get_name().strip().upper()
        if is_mse and name == "SE":
            name = "SD"
        index = rc.atom_order.get(name)
        if index is None:
            continue
        pos[index] = atom.get_coord()
        mask[index] = 1.0
        bfac[index] = atom.get_bfactor()
    return pos, mask, bfac
