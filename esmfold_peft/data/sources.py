"""Where chains come from: lists of (file, chain, sampling weight), made without parsing any structure.

Three sources:

* `openfold_source`: OpenFold's layout, a directory of mmCIF files plus `chain_data_cache.json`
  (per chain id "1abc_A": release_date, seq, resolution, cluster_size, ...), with OpenFold's
  filters and sampling weights;
* `directory_source`: a plain directory of PDB / mmCIF files (every protein chain of every file);
* `demo_source`: the TS50 demo set, one of its two splits (see `esmfold_peft.data.demo`).

A `Source` carries its settings so that a cache built from it knows when it is stale.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esmfold_peft.data import demo
from esmfold_peft.data.structures import chain_name, file_stem, is_structure_file
from esmfold_peft.runtime.artifacts import read_json
from esmfold_peft.runtime.errors import ArtifactError, ConfigError

# OpenFold's mmCIF directories hold <pdb id>.cif; gzipped copies are read as well
_MMCIF_SUFFIXES = (".cif", ".cif.gz", ".mmcif", ".mmcif.gz")
_SAFE_PDB_ID = re.compile(r"[A-Za-z0-9_-]+")  # a pdb id becomes part of a file path: nothing that climbs out


@dataclass(frozen=True)
class Entry:
    """One chain to read (or every protein chain of the file when chain_id is None)."""

    name: str
    path: str
    chain_id: str | None
    weight: float = 1.0


@dataclass(frozen=True)
class Source:
    """Entries plus the settings that produced them (part of a cache's fingerprint)."""

    kind: str
    entries: list[Entry]
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChainFilter:
    """OpenFold's hard training filters (AF2 supplement 1.2.5), plus optional length and date limits.

    Dates are ISO strings compared inclusively; a chain without a release date fails a date limit.
    An unknown resolution passes, as in OpenFold's `deterministic_train_filter`.
    """

    max_resolution: float = 9.0
    max_single_residue_fraction: float = 0.8
    max_length: int | None = None
    min_release_date: str | None = None
    max_release_date: str | None = None


def passes_filter(record: dict, flt: ChainFilter) -> bool:
    """Whether a chain_data_cache record passes `flt`."""
    seq = record["seq"]
    if not seq:
        return False
    resolution = record.get("resolution")
    if resolution is not None and resolution > flt.max_resolution:
        return False
    if max(Counter(seq).values()) / len(seq) > flt.max_single_residue_fraction:
        return False
    if flt.max_length is not None and len(seq) > flt.max_length:
        return False
    date = record.get("release_date")
    if flt.min_release_date is not None and (date is None or date < flt.min_release_date):
        return False
    if flt.max_release_date is not None and (date is None or date > flt.max_release_date):
        return False
    return True


def openfold_sampling_weight(length: int, cluster_size: int | None) -> float:
    """(1 / cluster_size) * max(min(L, 512), 256) / 512, as OpenFold's stochastic filter."""
    weight = max(min(length, 512), 256) / 512
    if cluster_size is not None and cluster_size > 0:
        weight /= cluster_size
    return weight


def openfold_source(mmcif_dir: str | Path, chain_data_cache: str | Path,
                    flt: ChainFilter = ChainFilter()) -> Source:
    """Chains of chain_data_cache.json that pass `flt`, each pointing at <mmcif_dir>/<pdb id>.cif.

    A chain whose file is absent still gets an entry (at the .cif path); building the cache
    reports it as a bad file, so a partial mirror shows up instead of shrinking silently.
    """
    mmcif_dir = Path(mmcif_dir).resolve()
    if not mmcif_dir.is_dir():
        raise ArtifactError(mmcif_dir, "no such mmCIF directory")
    records = read_json(Path(chain_data_cache), dict, "chain data cache")
    entries = []
    for chain_id_full in sorted(records):
        record = records[chain_id_full]
        if not isinstance(record, dict) or not isinstance(record.get("seq"), str):
            raise ArtifactError(chain_data_cache, f"entry {chain_id_full!r} is not an object with a 'seq' string")
        try:
            if not passes_filter(record, flt):
                continue
        except (TypeError, ValueError) as exc:
            raise ArtifactError(chain_data_cache, f"entry {chain_id_full!r}: unusable field ({exc})") from exc
        pdb_id, _, chain_id = chain_id_full.rpartition("_")
        if not pdb_id or not chain_id or not _SAFE_PDB_ID.fullmatch(pdb_id):
            raise ArtifactError(chain_data_cache, f"chain id {chain_id_full!r} is not <pdb id>_<chain> "
                                                  "(pdb ids are letters, digits, '-' and '_')")
        entries.append(Entry(
            name=chain_id_full,
            path=str(_find_mmcif(mmcif_dir, pdb_id)),
            chain_id=chain_id,
            weight=openfold_sampling_weight(len(record["seq"]), record.get("cluster_size")),
        ))
    settings = {"mmcif_dir": str(mmcif_dir), "chain_data_cache": str(Path(chain_data_cache).resolve()),
                "filter": asdict(flt)}
    return Source(kind="openfold", entries=entries, settings=settings)


def _find_mmcif(mmcif_dir: Path, pdb_id: str) -> Path:
    for suffix in _MMCIF_SUFFIXES:
        for stem in (pdb_id, pdb_id.lower(), pdb_id.upper()):
            candidate = mmcif_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return mmcif_dir / f"{pdb_id}.cif"


def directory_source(directory: str | Path, recursive: bool = False) -> Source:
    """Every PDB / mmCIF file (optionally .gz) in a directory, weight 1, all protein chains each."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise ArtifactError(directory, "no such structure directory")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in directory.glob(pattern) if p.is_file() and is_structure_file(p))
    entries = [Entry(name=file_stem(p), path=str(p), chain_id=None) for p in files]
    return Source(kind="directory", entries=entries,
                  settings={"directory": str(directory), "recursive": recursive})


def demo_source(split: str, root: str | Path | None = None) -> Source:
    """The TS50 demo chains of one split ('train' or 'val'); each file holds one chain."""
    paths = demo.demo_paths(root)
    names = demo.read_split(paths).get(split)
    if names is None:
        raise ConfigError(f"unknown demo split {split!r} (expected 'train' or 'val')")
    entries = []
    for file_name in names:
        path = (paths.structures_dir / file_name).resolve()
        chain_id = file_stem(file_name)[4:]  # TS50 names are <pdb id><chain id>
        entries.append(Entry(name=chain_name(path, chain_id), path=str(path), chain_id=chain_id))
    return Source(kind="demo", entries=entries,
                  settings={"root": str(paths.root.resolve()), "split": split})
