"""What every application's process shares: device choice, distributed set-up, autocast, signals, logs.

    d, device = setup_distributed("auto")      # torchrun's RANK/WORLD_SIZE, gloo on CPU, NCCL on GPU
    with StopSignal() as stop:                   # Ctrl-C / SIGTERM
        with stop.deferred():                    # inside: finish the step, then stop cleanly
            ...train one step...
        if stop.requested: ...checkpoint and leave...

Outside `deferred()`, a signal raises KeyboardInterrupt at once (set-up, validation, export), which
the application turns into an interrupted status and exit code 130.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger("esmfold_peft")


def resolve_device(name: Optional[str], local_rank: int = 0) -> torch.device:
    """`name` as a torch device; None or 'auto' picks CUDA (this process's GPU) when available, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:1, … or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported (use cpu, cuda, cuda:N or auto)")
    return device


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked; never on CPU (slow there, and the references are float32)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """This process's place (torchrun's environment) and device; the process group when there are several."""
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size())
    device = resolve_device(device_pref, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        # rank 0 validates while the others wait in their next collective: allow for it
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return d, device


def teardown_distributed(synchronize: bool = True) -> None:
    """Leave the process group; the one way every process of a torchrun job (or the GPU suite's) ends.

    With `synchronize`, every process first waits for the others at a barrier: a process that destroys its
    group, or exits, while another is still communicating pulls the connection (and, without torchrun, the
    rendezvous store rank 0 hosts) from under it, which can abort the other process at exit ("terminate
    called without an active exception", exit -6) after its work was done. On gloo the barrier is
    `monitored_barrier`, which names a process that never arrives instead of waiting out the 2-hour timeout.
    An error path passes `synchronize=False`: the others may never get there.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(minutes=10))
            else:
                dist.barrier()
        except RuntimeError as exc:  # a process died or hangs: leave without it
            log.warning("not every process reached the end of the job (%s); leaving anyway", exc)
    dist.destroy_process_group()


class StopSignal:
    """SIGINT/SIGTERM: inside `deferred()` they ask to stop after the current step; elsewhere they interrupt."""

    def __init__(self):
        self.requested = False
        self._deferring = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave Python's defaults
                pass
        return self

    @contextlib.contextmanager
    def deferred(self):
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def _handle(self, signum, frame):
        if self.requested or not self._deferring:  # a second signal, or nothing to finish: stop now
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (signal again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def setup_file_logging(path: Path) -> logging.Handler:
    """`path` receives the package's log records (INFO and up) until the handler is removed."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def remove_file_logging(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def step_seed(seed: int, step: int, stream: str = "") -> int:
    """A 63-bit generator seed that depends only on (seed, step, stream): what a step draws, whenever it runs.

    Resumed runs draw what an uninterrupted run would; `stream` separates independent draws of one
    step (data order, dropout).
    """
    key = f"{seed}:{step}" if not stream else f"{stream}:{seed}:{step}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
