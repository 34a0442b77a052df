"""The benchmark smoke runs, started in the background when the test session starts.

Each benchmark script runs in a fresh interpreter, single-threaded, as `make bench` runs it: minutes of
subprocess time that would leave one of a 2-core machine's cores idle while they ran. So they run one
after another in a background thread from the start of the session, beside the in-process tests, and
the tests that read them are moved to the end of the session (conftest.py); a test that needs a run
that is not finished waits for it.

    result = background.result("bench")     # in a fixture: waits, then the job's outputs
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TIMEOUT_S = 900


def run(*cmd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)


def gpu_suite(folder: Path) -> dict:
    out = folder / "gpu_suite.json"
    return {"out": out, "proc": run(BENCH / "gpu_suite.py", "--device", "cpu", "--smoke", "--out", out)}


def bench(folder: Path) -> dict:
    """`make bench`'s scripts through run_all.py (own results root, BENCHMARKS.md untouched), then esm_attention.py
    (part of `make bench-long`) into the same machine folder."""
    before = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    everything = run(BENCH / "run_all.py", "--smoke", "--device", "cpu", "--results-root", folder)
    after = (ROOT / "BENCHMARKS.md").stat().st_mtime if (ROOT / "BENCHMARKS.md").exists() else None
    machines = [p for p in folder.iterdir() if p.is_dir()]
    attention = None
    if len(machines) == 1:
        attention = run(BENCH / "esm_attention.py", "--smoke", "--device", "cpu", "--out",
                        machines[0] / "esm_attention.json")
    return {"root": folder, "machines": machines, "run_all": everything, "esm_attention": attention,
            "benchmarks_md_untouched": before == after}


def nlp_bench(folder: Path) -> dict:
    have_peft = importlib.util.find_spec("peft") is not None
    step = run(BENCH / "nlp_adapter_step.py", "--device", "cpu", "--smoke", "--out", folder / "step.json",
               *([] if have_peft else ["--no-peft"]))
    dpo = run(BENCH / "nlp_dpo_reference.py", "--device", "cpu", "--smoke", "--out", folder / "dpo.json")
    return {"folder": folder, "have_peft": have_peft, "nlp_adapter_step": step, "nlp_dpo_reference": dpo}


# job name -> (the test file that reads it, the function that makes it)
JOBS = {"gpu_suite": ("test_gpu_suite_smoke.py", gpu_suite), "bench": ("test_bench_smoke.py", bench),
        "nlp_bench": ("test_bench_nlp_smoke.py", nlp_bench)}


class _Runner:
    def __init__(self):
        self.root = None
        self.results: dict = {}
        self.done: dict[str, threading.Event] = {}
        self.thread = None

    def start(self, names) -> None:
        """Run the jobs `names` one after another in a background thread (from the first call on)."""
        names = [n for n in JOBS if n in set(names) and n not in self.done]
        if not names:
            return
        self.root = self.root or Path(tempfile.mkdtemp(prefix="esmfold_peft_bench_smoke_"))
        for name in names:
            self.done[name] = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(names,), daemon=True)
        self.thread.start()

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
        """The job's outputs (started now if the session did not start it), once it has finished."""
        if name not in self.done:
            self.start([name])
        self.done[name].wait(TIMEOUT_S * 3)
        result = self.results.get(name)
        if isinstance(result, BaseException) or result is None:
            raise RuntimeError(f"the background benchmark run {name!r} failed: {result!r}")
        return result

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join(TIMEOUT_S * 3)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


runner = _Runner()
result = runner.result
