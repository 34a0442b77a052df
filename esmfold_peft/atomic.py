"""Writing files atomically: a temporary file in the same folder, then one rename.

A reader (or a resumed run) sees either the old file or the new one, never half of one, even when
the writer is killed midway.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


TEMP_PREFIX = "."  # temporaries are `.<name>.<random>` beside the target (see `remove_stale_temporaries`)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename tmp_path over `target` (the temporary is removed on failure).

    The file gets the permissions any new file gets (0666 less the umask), not mkstemp's 0600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data) -> None:
    """JSON with one-space indentation; values json cannot encode are written as strings."""
    text = json.dumps(data, indent=1, default=str) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def remove_stale_temporaries(directory: Path, name: str) -> int:
    """Delete temporaries of `name` left in `directory` by a writer that was killed; return how many."""
    removed = 0
    for tmp in Path(directory).glob(f"{TEMP_PREFIX}{name}.*"):
        if tmp.is_file():
            tmp.unlink()
            removed += 1
    return removed
