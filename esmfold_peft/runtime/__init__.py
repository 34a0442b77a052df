"""What every application shares: errors and exit codes, checked artefacts, configs, the run directory,
device and distributed set-up, signals and logging, and the scripts' exit path.

Imports torch, ml-collections and safetensors only: `adapters/`, `data/`, `eval/`, `fold/` and
`nlp/` may all use it; it uses none of them.
"""

from .errors import (COMPLETED, DIVERGED, EXIT_CODES, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED,
                     EXIT_USAGE, FAILED, INTERRUPTED, RUNNING, STATUSES, ArtifactError, ConfigError, OutputPathError,
                     UserError)

__all__ = ["COMPLETED", "DIVERGED", "EXIT_CODES", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SOME_FAILED",
           "EXIT_USAGE", "FAILED", "INTERRUPTED", "RUNNING", "STATUSES", "ArtifactError", "ConfigError",
           "OutputPathError", "UserError"]
