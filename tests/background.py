"""Test work that runs in other processes, started in the background when the test session starts.

The benchmark smoke runs (each script in a fresh interpreter, single-threaded, as `make bench` runs
them) and the multi-process runs (torchrun, DDP over gloo) spend most of their time in subprocesses:
run in the test's turn, they would leave one of a 2-core machine's cores idle while the other waits.
So a test module declares that part as a job next to its test,

    @background.job("torchrun_train")
    def torchrun_train(folder):          # a fresh folder of its own; returns what the test reads
        return subprocess.run([...], ...)

    def test_torchrun(...):
        proc = background.result("torchrun_train")   # waits for it if needed
        assert proc.returncode == 0 ...

and conftest.py starts the jobs of the collected modules when collection ends, one after another in a
background thread beside the in-process tests, and moves the tests that read them to the end of the
session. A job that fails hands its exception to the test that reads it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
JOBS: dict[str, tuple[str, Callable[[Path], object]]] = {}  # name -> (its test file's name, the job)


def job(name: str):
    """Register `fn(folder) -> result` as the background job `name` of the module that defines it."""

    def register(fn):
        JOBS[name] = (Path(sys.modules[fn.__module__].__file__).name, fn)
        return fn

    return register


def run(*cmd, env=None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python *cmd` in the project root, output captured."""
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


class _Runner:
    def __init__(self):
        self.root = None
        self.results: dict = {}
        self.done: dict[str, threading.Event] = {}
        self.threads = []

    def start(self, names) -> None:
        """Run the jobs `names` one after another, in registration order, in a background thread."""
        names = [n for n in JOBS if n in set(names) and n not in self.done]
        if not names:
            return
        self.root = self.root or Path(tempfile.mkdtemp(prefix="esmfold_peft_test_jobs_"))
        for name in names:
            self.done[name] = threading.Event()
        thread = threading.Thread(target=self._work, args=(names,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _work(self, names) -> None:
        for name in names:
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            try:
                self.results[name] = JOBS[name][1](folder)
            except BaseException as exc:  # handed to the test that reads the job
                self.results[name] = exc
            finally:
                self.done[name].set()

    def result(self, name: str):
        """The job's result (the job is started now if the session did not start it), once it has finished."""
        if name not in self.done:
            self.start([name])
        if not self.done[name].wait(TIMEOUT_S * 3):
            raise TimeoutError(f"the background job {name!r} did not finish")
        result = self.results.get(name)
        if isinstance(result, BaseException):
            raise RuntimeError(f"the background job {name!r} failed: {result!r}") from result
        return result

    def finish(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT_S * 3)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


runner = _Runner()
result = runner.result
