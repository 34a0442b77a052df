"""One vocabulary for how runs and scripts end: exit codes, run statuses and user errors.

Every script exits with one of these codes (the README has the table):

    0    done
    1    some inputs failed (the others were processed and reported)
    2    unusable arguments or inputs (a one-line error names the file and the fault)
    3    the run diverged (the last good checkpoint is kept)
    130  interrupted (Ctrl-C or SIGTERM; a run resumes with --resume)

A `UserError` is a fault in what the user gave (a flag, a file, a config value). Scripts catch
exactly this class and print its one line; any other exception is a bug in the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_SOME_FAILED: "some inputs failed; the others were processed and are reported",
    EXIT_USAGE: "unusable arguments or inputs; one line names the file and the fault",
    EXIT_DIVERGED: "the run diverged; the last good checkpoint is kept",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); a run continues with --resume",
}

# the statuses a run directory's summary.json can hold
RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED = "running", "completed", "diverged", "interrupted", "failed"
STATUSES = (RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED)
STATUS_EXIT = {COMPLETED: EXIT_OK, DIVERGED: EXIT_DIVERGED, INTERRUPTED: EXIT_INTERRUPTED, FAILED: EXIT_USAGE}


class UserError(Exception):
    """A fault in the user's arguments, configuration or files: printed as one line, exit status 2."""

    exit_code = EXIT_USAGE


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used."""


class ArtifactError(UserError):
    """A file that cannot be used: missing, damaged, of the wrong structure, non-finite, tampered with."""

    def __init__(self, path: Union[str, Path, None], fault: str):
        self.path = None if path is None else Path(path)
        self.fault = fault
        super().__init__(fault if path is None else f"{path}: {fault}")

    def __reduce__(self):  # pickled with its two arguments (DataLoader workers, torchrun processes)
        return type(self), (self.path, self.fault)


class OutputPathError(UserError):
    """An output location that cannot be written (an existing file, a read-only folder, a name too long)."""


def describe_os_error(exc: OSError, path: Optional[Union[str, Path]] = None) -> str:
    """`path: reason` for an OSError, without Python's errno noise."""
    where = path if path is not None else (exc.filename or "")
    reason = exc.strerror or str(exc)
    return f"{where}: {reason.lower()}" if where else reason.lower()
