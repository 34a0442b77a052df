"""Weight files and JSON written with a checksum, and checked whenever they are read back.

Every weight file the project writes (checkpoints, exported models, adapters) gets a sidecar
`<file>.sha256` holding its SHA-256. The sidecar is written before the file is renamed into place
and keeps the previous digest too, so a writer killed between the two renames leaves a pair that
still verifies; a file that matches neither digest was changed by something else and is refused.

Reading a weight file checks, in order: it exists, it parses, its checksum (when one was
recorded), every tensor is floating point and finite. Each fault is an `ArtifactError` naming the
file and the fault in one line: nothing damaged is ever used silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..atomic import atomic_write
from .errors import ArtifactError

CHECKSUM_SUFFIX = ".sha256"
HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def write_checksummed(path: Path, write: Callable[[str], None]) -> str:
    """Atomically write a weight file through `write(tmp)` and record its SHA-256; return the digest."""
    path = Path(path)
    digest = {}

    def write_and_record(tmp: str) -> None:
        write(tmp)
        digest["new"] = sha256_file(Path(tmp))
        previous = recorded_checksums(path)[:1]
        if not previous and path.is_file():  # a file from before checksums: keep it verifiable if we die now
            previous = [sha256_file(path)]
        record = {"sha256": digest["new"], "previous": previous[0] if previous else None}
        atomic_write(checksum_path(path), lambda t: Path(t).write_text(json.dumps(record) + "\n"))

    atomic_write(path, write_and_record)
    return digest["new"]


def recorded_checksums(path: Path) -> list[str]:
    """The digests a file may have: the recorded one, then the one before it ([] when none recorded)."""
    side = checksum_path(path)
    if not side.is_file():
        return []
    try:
        record = json.loads(side.read_text())
        digests = [d for d in (record["sha256"], record.get("previous")) if d]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ArtifactError(side, f"damaged checksum record ({type(exc).__name__}: {exc})") from exc
    if not digests or not all(isinstance(d, str) and len(d) == 64 and all(c in HEX for c in d) for d in digests):
        raise ArtifactError(side, "damaged checksum record (digests must be 64 hexadecimal characters)")
    return digests


def verify_checksum(path: Path) -> Optional[str]:
    """Check `path` against its recorded SHA-256; return the digest, or None when none was recorded."""
    expected = recorded_checksums(path)
    if not expected:
        return None
    actual = sha256_file(path)
    if actual not in expected:
        raise ArtifactError(path, f"checksum mismatch: SHA-256 {actual[:12]}… is not the recorded "
                                  f"{expected[0][:12]}… (the file was changed or damaged after it was written)")
    return actual


def copy_checksummed(source: Path, target: Path) -> str:
    """`target` becomes a copy of the weight file `source` (verified first), atomically, with its own sidecar.

    A hard link when the file system allows it (no second copy on disk: the writers replace files by
    renaming, never in place), a byte copy otherwise.
    """
    import os
    import shutil

    verify_checksum(require_file(source, "checkpoint"))

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    return write_checksummed(target, write)


def require_file(path: Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(path, f"no such {what}")
    if not path.is_file():
        raise ArtifactError(path, f"not a {what} (a directory or special file)")
    return path


def check_tensors(tensors: Mapping[str, object], path: Path, allow_integer: Iterable[str] = ()) -> None:
    """Every value is a floating-point tensor with finite values (names in `allow_integer` may be integer)."""
    allowed = set(allow_integer)
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(path, f"entry {name!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            if name in allowed and not value.is_complex():
                continue
            raise ArtifactError(path, f"tensor {name!r} has dtype {str(value.dtype).replace('torch.', '')}; "
                                      "weights must be floating point")
        if value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ArtifactError(path, f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf)")


def load_safetensors(path: Path, check_values: bool = True) -> dict[str, torch.Tensor]:
    """A .safetensors file as a dict of tensors, verified (see the module docstring)."""
    from safetensors.torch import load_file

    path = require_file(path, "weight file")
    verify_checksum(path)
    if path.stat().st_size == 0:
        raise ArtifactError(path, "empty file (not a safetensors file)")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types, and OSError/ValueError
        raise ArtifactError(path, f"damaged or not a safetensors file ({_short(exc)})") from exc
    if check_values:
        check_tensors(tensors, path)
    return tensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> str:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_checksummed(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` of a verified file; damage is an ArtifactError."""
    path = require_file(path, "checkpoint")
    verify_checksum(path)
    if path.stat().st_size == 0:
        raise ArtifactError(path, "empty file (not a checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zip errors ...
        raise ArtifactError(path, f"damaged or not a PyTorch checkpoint ({_short(exc)})") from exc


def torch_save(obj: object, path: Path) -> str:
    return write_checksummed(Path(path), lambda tmp: torch.save(obj, tmp))


def read_json(path: Path, expect: type = dict, what: str = "JSON file") -> object:
    """A JSON file whose top level is `expect`; missing, unreadable, malformed or wrongly shaped -> ArtifactError."""
    path = require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(path, f"cannot read ({_short(exc)})") from exc
    if not text.strip():
        raise ArtifactError(path, "empty file (expected JSON)")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, expect):
        raise ArtifactError(path, f"expected a JSON {_json_kind(expect)}, found a {_json_kind(type(data))}")
    return data


def require_keys(data: Mapping, keys: Mapping[str, type], path: Path) -> None:
    """Each key present with a value of the given type (a tuple of types allowed)."""
    for key, kind in keys.items():
        if key not in data:
            raise ArtifactError(path, f"lacks the key {key!r}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ArtifactError(path, f"key {key!r} should be a {_json_kind(kind)}, "
                                      f"found {type(data[key]).__name__}")


def _json_kind(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_json_kind(k) for k in kind)
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            bool: "boolean"}.get(kind, getattr(kind, "__name__", str(kind)))


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"
