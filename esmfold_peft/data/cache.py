"""Parse once, load fast: a per-chain cache of a `Source` (one .npz per chain + manifest.json).

    <cache_dir>/manifest.json      format version, fingerprint, chains, bad files, per-file stats
    <cache_dir>/chains/<safe name>.<hash>.npz   one parsed chain (no pickles)

`build_cache` compares the source's fingerprint (format version, source settings, entries, and
every file's size and modification time) with the manifest's: equal means nothing to do; otherwise
only files that are new or changed (size, mtime, or the chains asked of them) are parsed again.
Bad files, and chains that are missing or unusable (`chain_fault`: no residues, no Cα, non-finite
coordinates), are skipped and listed in the manifest's `bad` list with the reason.

Chain ids come from the structure files, so they are not trusted as file names: a chain's file
name keeps only [A-Za-z0-9._-] of its name, never starts with '.', is bounded in length, and carries
a hash of (file path, chain id) that keeps it unique; every chain file is checked to lie directly
in `chains/` before it is written or read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esmfold_peft.atomic import atomic_write, write_json_atomic
from esmfold_peft.data.sources import Entry, Source
from esmfold_peft.data.structures import Chain, StructureError, chain_fault, parse_structure
from esmfold_peft.runtime.errors import ArtifactError
from esmfold_peft.runtime.progress import Progress

CACHE_FORMAT_VERSION = 2  # 2: sanitised chain file names, unusable chains skipped
MANIFEST = "manifest.json"
CHAINS_DIR = "chains"
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_CHARS = 100  # the whole file name stays far below the usual 255-byte limit


@dataclass(frozen=True)
class ChainRecord:
    """One cached chain: its name, where it came from, its .npz file, length and sampling weight."""

    name: str
    path: str
    file: str
    chain_id: str
    length: int
    weight: float


class ChainCache:
    """Read side of a built cache: the chain list, sampling weights, bad files, and `load`."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise FileNotFoundError(f"no chain cache in {self.cache_dir} (missing or outdated "
                                    f"{MANIFEST}); build it with build_cache()")
        self.fingerprint: str = manifest["fingerprint"]
        self.records = [ChainRecord(**r) for r in manifest["chains"]]
        self.bad: list[tuple[str, str]] = [(b["path"], b["reason"]) for b in manifest["bad"]]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.records]

    def load(self, index: int) -> Chain:
        return load_chain(self._chain_file(index))

    def sequence(self, index: int) -> str:
        """The chain's sequence alone (one member of its .npz is read, not its coordinates)."""
        with np.load(self._chain_file(index), allow_pickle=False) as z:
            return str(z["sequence"])

    def _chain_file(self, index: int) -> Path:
        return chain_file_path(self.cache_dir / CHAINS_DIR, self.records[index].file, culprit=self.cache_dir / MANIFEST)


def build_cache(source: Source, cache_dir: str | Path, workers: int = 1,
                progress: bool = True) -> ChainCache:
    """Bring `cache_dir` up to date with `source` (parsing only what changed) and open it."""
    cache_dir = Path(cache_dir)
    chains_dir = cache_dir / CHAINS_DIR
    chains_dir.mkdir(parents=True, exist_ok=True)
    requests = _requests_by_file(source.entries)
    stats = {path: _file_stat(path) for path in requests}
    fingerprint = source_fingerprint(source, stats)
    old = read_manifest(cache_dir)
    if old is not None and old["fingerprint"] == fingerprint:
        return ChainCache(cache_dir)

    old_files = old["files"] if old is not None else {}
    files: dict[str, dict] = {}
    todo = []
    for path, chain_ids in requests.items():
        state = {**stats[path], "chain_ids": chain_ids}
        previous = old_files.get(path)
        if previous is not None and _reusable(previous, state, chains_dir):
            files[path] = previous
        else:
            todo.append((path, chain_ids, state))

    for path, result in _parse_files(todo, chains_dir, workers, progress):
        files[path] = result

    manifest = _assemble_manifest(source, requests, files, fingerprint)
    write_json_atomic(cache_dir / MANIFEST, manifest)
    _remove_unlisted_chain_files(chains_dir, files)
    return ChainCache(cache_dir)


def source_fingerprint(source: Source, stats: dict[str, dict]) -> str:
    """SHA-256 over the cache format version, source settings, entries and file stats."""
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "kind": source.kind,
        "settings": source.settings,
        "entries": [asdict(e) for e in source.entries],
        "stats": {path: stats[path] for path in sorted(stats)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The manifest, or None when absent, unreadable, or of another cache format version."""
    try:
        manifest = json.loads((Path(cache_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format_version") == CACHE_FORMAT_VERSION else None


# --- one chain on disk -----------------------------------------------------------------------------

def chain_file_name(name: str, path: str, chain_id: str) -> str:
    """`<safe name>.<hash>.npz` for a chain: only [A-Za-z0-9._-], no leading '.', bounded length.

    The hash of (source path, chain id) keeps names apart that sanitise alike ('A/B' and 'A_B'),
    and equal chain names from different files.
    """
    safe = _UNSAFE_FILE_CHARS.sub("_", name)[:_MAX_NAME_CHARS]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    tag = hashlib.sha1(f"{path}\0{chain_id}".encode()).hexdigest()[:10]
    return f"{safe}.{tag}.npz"


def chain_file_path(chains_dir: Path, file: str, culprit: str | Path) -> Path:
    """`chains_dir / file`, refusing a name that would put the file anywhere but directly in chains_dir.

    `culprit` is the file blamed if it does: the manifest on reading, the structure on writing.
    """
    path = Path(chains_dir) / file
    if path.resolve().parent != Path(chains_dir).resolve():
        raise ArtifactError(culprit, f"chain file name {file!r} leads outside the cache's {CHAINS_DIR}/ directory")
    return path


def save_chain(chain: Chain, path: str | Path) -> None:
    """Write a chain as an uncompressed .npz (strings as unicode arrays, so no pickle is needed)."""
    arrays = dict(
        name=np.array(chain.name), chain_id=np.array(chain.chain_id),
        sequence=np.array(chain.sequence), aatype=chain.aatype,
        atom37_positions=chain.atom37_positions, atom37_mask=chain.atom37_mask,
        b_factors=chain.b_factors, residue_index=chain.residue_index,
        insertion_codes=np.array(chain.insertion_codes, dtype="<U4"),
        resolution=np.array(chain.resolution, dtype=np.float64),
        release_date=np.array(chain.release_date or ""), source=np.array(chain.source),
    )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a bare path
            np.savez(fh, **arrays)

    atomic_write(Path(path), write)


def load_chain(path: str | Path) -> Chain:
    with np.load(path, allow_pickle=False) as z:
        return Chain(
            name=str(z["name"]), chain_id=str(z["chain_id"]), sequence=str(z["sequence"]),
            aatype=z["aatype"], atom37_positions=z["atom37_positions"],
            atom37_mask=z["atom37_mask"], b_factors=z["b_factors"],
            residue_index=z["residue_index"], insertion_codes=[str(c) for c in z["insertion_codes"]],
            resolution=float(z["resolution"]), release_date=str(z["release_date"]) or None,
            source=str(z["source"]),
        )


# --- building ------------------------------------------------------------------------------------

def _requests_by_file(entries: list[Entry]) -> dict[str, list[str] | None]:
    """Path -> sorted chain ids asked of it (None: every protein chain), in first-seen order."""
    requests: dict[str, list[str] | None] = {}
    for e in entries:
        if e.chain_id is None or (e.path in requests and requests[e.path] is None):
            requests[e.path] = None
        else:
            requests[e.path] = sorted({*requests.get(e.path, []), e.chain_id})
    return requests


def _file_stat(path: str) -> dict:
    try:
        st = os.stat(path)
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _reusable(previous: dict, state: dict, chains_dir: Path) -> bool:
    same = all(previous.get(k) == v for k, v in state.items())
    return same and all((chains_dir / c["file"]).is_file() for c in previous["chains"])


def _parse_files(todo: list, chains_dir: Path, workers: int, progress: bool):
    """Yield (path, file record) for each file, in parallel when workers > 1."""
    bar = Progress(len(todo), "preprocessing structures", enabled=progress and bool(todo), unit="file")
    args = [(path, chain_ids, state, str(chains_dir)) for path, chain_ids, state in todo]
    try:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for path_and_record in pool.map(_parse_file, args, chunksize=8):
                    bar.update()
                    yield path_and_record
        else:
            for a in args:
                path_and_record = _parse_file(a)
                bar.update()
                yield path_and_record
    finally:
        bar.close()


def _parse_file(args) -> tuple[str, dict]:
    """Parse one file and save its usable chains; the file's manifest record.

    The record holds the file's `error`, or its saved `chains` and the `skipped` ones (chain id ->
    reason: missing from the file, or unusable).
    """
    path, chain_ids, state, chains_dir = args
    record = {**state, "error": None, "chains": [], "skipped": {}}
    try:
        chains = parse_structure(path)
    except StructureError as exc:
        record["error"] = exc.reason
        return path, record
    by_id = {c.chain_id: c for c in chains}
    for chain_id in chain_ids if chain_ids is not None else list(by_id):
        chain = by_id.get(chain_id)
        reason = _skip_reason(chain_id, chain, by_id)
        if reason is not None:
            record["skipped"][chain_id] = reason
            continue
        file = chain_file_name(chain.name, path, chain_id)
        save_chain(chain, chain_file_path(chains_dir, file, culprit=path))
        record["chains"].append({"name": chain.name, "chain_id": chain_id, "file": file, "length": len(chain)})
    return path, record


def _skip_reason(chain_id: str, chain: Chain | None, by_id: dict[str, Chain]) -> str | None:
    """Why a requested chain is not cached (absent from the file, or unusable), or None."""
    if chain is None:
        return (f"no protein chain {chain_id!r} in the first model "
                f"(protein chains there: {', '.join(by_id) or 'none'})")
    fault = chain_fault(chain)
    return None if fault is None else f"chain {chain_id!r} ({chain.name}): {fault}"


def _assemble_manifest(source: Source, requests: dict, files: dict, fingerprint: str) -> dict:
    """Chains in entry order (a file's chains in file order), weights from the entries, bad files."""
    chains, bad, seen = [], [], {}
    for entry in source.entries:
        record = files[entry.path]
        if record["error"] is not None:
            continue
        skipped = record["skipped"]
        if entry.chain_id is None:
            bad += [{"path": entry.path, "reason": reason} for reason in skipped.values()]
        elif entry.chain_id in skipped:
            bad.append({"path": entry.path, "reason": skipped[entry.chain_id]})
            continue
        for c in record["chains"]:
            if entry.chain_id is not None and c["chain_id"] != entry.chain_id:
                continue
            if c["name"] in seen:
                if seen[c["name"]] != entry.path:
                    bad.append({"path": entry.path, "reason": f"chain name {c['name']!r} "
                                                              f"already taken by {seen[c['name']]}"})
                continue
            seen[c["name"]] = entry.path
            chains.append(asdict(ChainRecord(name=c["name"], path=entry.path, file=c["file"],
                                             chain_id=c["chain_id"], length=c["length"],
                                             weight=entry.weight)))
    bad = [{"path": p, "reason": r["error"]} for p, r in files.items() if r["error"]] + bad
    return {"format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint,
            "source": {"kind": source.kind, "settings": source.settings},
            "chains": chains, "bad": bad, "files": {p: files[p] for p in requests}}


def _remove_unlisted_chain_files(chains_dir: Path, files: dict) -> None:
    keep = {c["file"] for record in files.values() for c in record["chains"]}
    for path in chains_dir.glob("*.npz"):
        if path.name not in keep:
            path.unlink()
