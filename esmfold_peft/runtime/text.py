"""How numbers and tables are written, the same in every report, log line and summary."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def finite_or_none(value) -> Optional[float]:
    """A score as a Python float for JSON and reports; None for None, NaN and Inf."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_score(value: Optional[float], digits: int = 4, missing: str = "n/a") -> str:
    """A score with `digits` decimals, or `missing` when there is none (None, NaN, Inf)."""
    value = finite_or_none(value)
    return missing if value is None else f"{value:.{digits}f}"


def format_count(n: Optional[int]) -> str:
    return "—" if n is None else f"{n:,}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (cells as str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
