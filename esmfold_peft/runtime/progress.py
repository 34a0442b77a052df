"""Progress that reads well wherever output goes: a tqdm bar on a terminal, plain lines elsewhere.

    with Progress(len(records), "predicting", unit="record") as bar:
        for r in records:
            ...
            bar.update(1, loss=0.3)

On a terminal (stderr is a TTY) this is tqdm's bar. When stderr is a file or a pipe (SLURM, nohup,
`2> log`), carriage-return redraws would pile up there, so the bar is replaced by one log line
(`predicting: 40/200 (20%), 1.3 s/record, ETA 3m28s`) at most every `every` seconds and at the
end; `every=None` prints no lines (the training loop writes its own step lines instead).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from tqdm.auto import tqdm

log = logging.getLogger("esmfold_peft.progress")


def is_terminal() -> bool:
    """Whether progress bars can redraw in place: stderr (where tqdm draws) is a terminal, or a notebook."""
    if "ipykernel" in sys.modules:  # tqdm.auto draws a widget there
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """A short human duration: 45s, 3m28s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A bar on a terminal, periodic lines elsewhere, nothing when disabled (see the module docstring)."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, unit: str = "it",
                 every: Optional[float] = 30.0, leave: bool = True):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self.start_n = initial
        self.enabled = enabled
        self.bar = None
        if enabled and is_terminal():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
        self.started = self.last_line = time.time()
        self.printed = initial  # the count the last line showed

    @classmethod
    def over(cls, items, desc: str, **kwargs):
        """Iterate `items` (a sized collection) with progress shown."""
        bar = cls(len(items), desc, **kwargs)
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and self.every is not None and time.time() - self.last_line >= self.every:
            self._line()

    def _line(self) -> None:
        self.last_line, self.printed = time.time(), self.n
        done = self.n - self.start_n
        rate = (self.last_line - self.started) / done if done else None
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total}{pct}"
        if rate is not None:
            text += f", {rate:.2f} s/{self.unit}"
            if self.total and self.n < self.total:
                text += f", ETA {duration(rate * (self.total - self.n))}"
        log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.every is not None and self.n != self.printed:
            self._line()
        self.enabled = False
