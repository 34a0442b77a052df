"""Kept for imports of older scripts: the argument types live in `esmfold_peft.runtime.cli`."""

from .runtime.cli import int_at_least, non_negative_int, positive_int  # noqa: F401
