"""How numbers and tables are written, the same in every report, log line and summary."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def finite_or_none(value):
    """NaN/Inf (and None) as None, for JSON and reports; other values unchanged."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_score(value: Optional[float], digits: int = 4) -> str:
    """A score with `digits` decimals, or 'n/a' when there is none (None, NaN, Inf)."""
    return "n/a" if finite_or_none(value) is None else f"{value:.{digits}f}"


def format_count(n: Optional[int]) -> str:
    return "—" if n is None else f"{n:,}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (cells as str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
