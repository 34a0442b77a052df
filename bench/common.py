"""What every benchmark shares: device choice, interleaved timing, peak tensor memory, summaries, tables.

Timing. Every variant is warmed up, then `repeats` rounds run; in each round the variants run in a
fresh random order and each is timed over `steps` consecutive calls (garbage collection off).
Machine noise therefore hits every variant alike. A variant's time is the median over rounds of its
seconds per call, with min–max; a ratio is computed within each round (both variants ran seconds
apart) and summarised the same way. On a single-threaded CPU run the clock is process CPU seconds
(`clock_for`), elsewhere wall seconds.

Memory. On CUDA: `torch.cuda.max_memory_allocated` over one call. On CPU torch keeps no peak
counter, so `TensorMemoryTracker` (a TorchDispatchMode) follows every tensor storage that an op
allocates during one call, forward, backward and optimizer step alike, until it is freed. On both
devices the peak of a variant is the bytes it keeps between calls (parameters, buffers, its
optimizer state, inputs: `resident`) plus the highest amount allocated during the call above
what was allocated when it started. That counts live tensor bytes, as `max_memory_allocated`
does, without allocator caching or fragmentation; on CPU it is deterministic and needs no repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

MiB = 2 ** 20
GiB = 2 ** 30


# --- arguments and device --------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="", help="JSON file to write (default bench/results/<machine>/<name>.json)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved rounds (0: the device's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="smallest shapes, to check that the script runs")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch CPU threads (default: 1 on CPU, see set_threads; 0: torch's default)")
    return p


SMOKE_RUNS = dict(repeats=2, steps=1, warmup=1)
FLAG_KEYS = ("repeats", "steps", "warmup", "crop")  # run settings a flag may set (0 or absent: keep)


def run_conf(args, defaults: dict, smoke: dict = SMOKE_RUNS) -> dict:
    """A benchmark's run settings: the device's defaults (`smoke` with --smoke), then those of FLAG_KEYS
    that the script's flags give."""
    conf = dict(smoke if args.smoke else defaults)
    conf.update({k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k, 0)})
    return conf


def set_threads(args, device: torch.device) -> None:
    """One thread on CPU unless asked otherwise: on a shared machine every parallel region of a
    2-thread run waits for both cores, so each op can cost a scheduler time slice whenever another
    process holds one (a tiny ESM-2 forward took 1 ms with 1 thread and 350 ms with 2 under load)."""
    n = args.threads
    if n < 0:
        n = 1 if device.type == "cpu" else 0
    if n > 0:
        torch.set_num_threads(n)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    return torch.device(name)


def merge_random_adapter(model, seed: int) -> None:
    """Give the folding model's LM adapter seeded nonzero factors, merge it and freeze the model (inference)."""
    from esmfold_peft.adapters import get_adapter_set

    aset = get_adapter_set(model.esm)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in aset.get().parameters():
            p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.2)
    aset.merge()
    model.requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; never on CPU (as the trainer)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def machine_tag(device: torch.device) -> str:
    """A short name for the machine kind, used as the results folder."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l40", "a10", "v100", "t4"):
            if key in name:
                return f"cuda-{key}"
        return "cuda"
    return f"cpu-{os.cpu_count()}core"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "tag": machine_tag(device),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": _git_commit(),
        "clock": clock_for(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return info


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


# --- timing ------------------------------------------------------------------------------------------

def clock_for(device: torch.device) -> str:
    """'cpu' for single-threaded CPU runs: process CPU seconds equal wall seconds on an idle machine and do
    not count the time slices other processes take on a shared one. Else 'wall'."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def interleaved(variants: Dict[str, Callable[[], None]], repeats: int, steps: int, device: torch.device,
                warmup: int = 1, seed: int = 0, log: Callable[[str], None] = print,
                best_of: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of every variant, one value per round; rounds interleave the variants.

    A measurement times `steps` consecutive calls; with `best_of` > 1 it is the fastest of that many
    back-to-back measurements (interference from other processes only ever adds time). The clock
    is `clock_for(device)`; wall seconds are kept too, under the key `"<variant>@wall"`.
    """
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
    rng = random.Random(seed)
    use_cpu = clock_for(device) == "cpu"
    times: Dict[str, List[float]] = {name: [] for name in variants}
    walls: Dict[str, List[float]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            fn = variants[name]
            best, best_wall = float("inf"), float("inf")
            for _ in range(best_of):
                gc.collect()
                gc.disable()
                try:
                    synchronize(device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(steps):
                        fn()
                    synchronize(device)
                    wall = (time.perf_counter() - t0) / steps
                    cpu = (time.process_time() - c0) / steps
                finally:
                    gc.enable()
                best, best_wall = min(best, cpu if use_cpu else wall), min(best_wall, wall)
            times[name].append(best)
            walls[name].append(best_wall)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in variants),
            flush=True)
    times.update({f"{n}@wall": v for n, v in walls.items()})
    return times


def summary(values: Sequence[float]) -> dict:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v), "values": list(values)}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict:
    """Per-round ratios num[i] / den[i], summarised (median, min, max)."""
    return summary([a / b for a, b in zip(num, den)])


# --- memory ------------------------------------------------------------------------------------------

def _storages(tensors: Iterable[torch.Tensor]) -> Dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            out[st._cdata] = st.nbytes()
    return out


def resident_bytes(*groups) -> int:
    """Bytes of the distinct storages behind the tensors in `groups` (modules, optimizers, tensors, dicts)."""
    tensors: List[torch.Tensor] = []
    for g in groups:
        if isinstance(g, torch.nn.Module):
            tensors += list(g.parameters()) + list(g.buffers())
            tensors += [p.grad for p in g.parameters() if p.grad is not None]
        elif isinstance(g, torch.optim.Optimizer):
            tensors += [t for state in g.state.values() for t in pytree.tree_leaves(state)
                        if isinstance(t, torch.Tensor)]
        else:
            tensors += [t for t in pytree.tree_leaves(g) if isinstance(t, torch.Tensor)]
    return sum(_storages(tensors).values())


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages allocated by ops inside the context, and their peak.

    A storage counts from the op that creates it until its last reference dies. Views and in-place
    results alias an input storage and are not new allocations.
    """

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set(_storages(pytree.tree_leaves((args, kwargs))))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self.live:
                continue
            nbytes = st.nbytes()
            self.live[key] = (weakref.ref(st, lambda ref, k=key, n=nbytes: self._free(k, n, ref)), nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def cuda_transient(fn: Callable[[], None], device: torch.device) -> int:
    """The most CUDA bytes allocated during one call of `fn` above what was allocated when it started."""
    synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def peak_memory(fn: Callable[[], None], device: torch.device, resident: Callable[[], int]) -> int:
    """Peak bytes one call of `fn` holds: `resident()` (what the variant keeps between calls) plus the
    highest amount allocated above what was allocated when the call started."""
    gc.collect()
    if device.type == "cuda":
        transient = cuda_transient(fn, device)
    else:
        tracker = TensorMemoryTracker()
        with tracker:
            fn()
        transient = tracker.peak
    return int(resident() + transient)


def measure_variants(steps: dict, conf: dict, device: torch.device, resident: dict, params: dict, floor: str,
                     seed: int, names=None) -> dict:
    """Time (interleaved rounds) and peak memory of each step variant, against the `floor` variant's."""
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=seed)
    memory = {name: peak_memory(fn, device, resident[name]) for name, fn in steps.items()}
    floor_t, floor_m = times[floor], memory[floor]
    return {name: {"trainable_parameters": params[name],
                   "seconds_per_step": summary(times[name]),
                   "wall_seconds_per_step": summary(times[name + "@wall"]),
                   "vs_floor": ratio_summary(times[name], floor_t),
                   "peak_bytes": memory[name],
                   "above_floor_bytes": memory[name] - floor_m} for name in (names or steps)}, times


# --- output ------------------------------------------------------------------------------------------

def default_out(device: torch.device, name: str, smoke: bool) -> Path:
    sub = machine_tag(device) + ("-smoke" if smoke else "")
    return BENCH_DIR / "results" / sub / f"{name}.json"


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def markdown_table(table: dict) -> str:
    """A table {"title", "columns", "rows", "notes"} as GitHub markdown."""
    cols = table["columns"]
    lines = [f"**{table['title']}**", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table["rows"]:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    for note in table.get("notes", ()):
        lines.append("")
        lines.append(note)
    return "\n".join(lines)


def fmt_ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}–{s['max'] * 1e3:.1f})"


def fmt_s(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def fmt_ratio(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def fmt_mib(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / MiB:,.1f}"


# --- the words of BENCHMARKS.md: what each script's `REPORT` reading uses ---------------------------------

TARGET_SHAPES = ("650M", "3B")  # the ESM-2 shapes the targets are stated for


def mib_text(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / MiB:,.1f} MiB"


def span(values, digits: int = 2) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def verdict_at_most(s: dict, target: float = 1.0) -> str:
    """A ratio summary (median, min, max) against an upper target."""
    if s["median"] <= target:
        return "met"
    if s["min"] <= target:
        return "not resolved (median above, spread includes the target)"
    return "missed"


def verdict_at_least(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def verdict_near(s: dict, target: float = 1.0, tolerance: float = 0.05) -> str:
    if abs(s["median"] - target) <= tolerance:
        return "met"
    if s["min"] <= target + tolerance and s["max"] >= target - tolerance:
        return "not resolved (median outside, spread reaches the band)"
    return "missed"


def worst_verdict(verdicts) -> str:
    for v in verdicts:
        if v == "missed":
            return v
    return next((v for v in verdicts if v != "met"), "met")


def finish(name: str, args, device: torch.device, started: float, load_before, payload: dict) -> Path:
    """Add the run's context to `payload`, write it, print its tables (last) and return the path."""
    data = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "smoke": bool(args.smoke),
        "machine": machine_info(device),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "wall_time_s": round(time.time() - started, 1),
        **payload,
    }
    out = Path(args.out) if args.out else default_out(device, name, args.smoke)
    write_json(out, data)
    print(f"\nwrote {out} ({data['wall_time_s']} s, load average before {load_before}, "
          f"after {data['load_average_after']})")
    for table in data["tables"]:
        print()
        print(markdown_table(table))
    return out


# --- one measurement per fresh process ---------------------------------------------------------------
# A benchmark whose cells may run out of memory runs each in its own process (`run_child`), under an
# address-space limit: the cell's peak RSS is its own, an allocation beyond the limit fails there (a
# result, not a crash of the whole run) and the machine's OOM killer is never reached.

_OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "memoryerror", "bad_alloc")


def child_main(run_cell: Callable[[dict], dict]) -> bool:
    """The child's side of `run_child`. When this process was started as `<script> --child <spec JSON>`:
    limit its address space to spec["memory_limit_gib"] GiB (0: none), use spec["threads"] torch threads
    (0: torch's default), run `run_cell(spec)` and write the dict it returns to spec["result_file"];
    return True. Otherwise return False (the script's normal entry point)."""
    if len(sys.argv) <= 2 or sys.argv[1] != "--child":
        return False
    spec = json.loads(sys.argv[2])
    if spec.get("memory_limit_gib", 0) > 0:
        import resource

        cap = int(spec["memory_limit_gib"] * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if spec.get("threads", 0) > 0:
        torch.set_num_threads(spec["threads"])
    result = run_cell(spec)
    Path(spec["result_file"]).write_text(json.dumps(result))
    return True


def run_child(script: Path, spec: dict, timeout: float, keys: Sequence[str]) -> dict:
    """Run `script --child <spec JSON>` in a fresh process (cwd: the repository) and return the dict its
    `child_main` wrote. A child that runs past `timeout` seconds, dies or exits nonzero gives
    {key: spec[key] for key in keys} with "status" "timed_out", "out_of_memory" (its last lines say so)
    or "failed", and "error". Every result gets "process_seconds" and "process_cpu_seconds" (the child's wall
    and CPU time, build included)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, result_file=str(Path(tmp) / "result.json"))
        cmd = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
        who = {k: spec[k] for k in keys}
        t0, cpu0 = time.time(), _children_cpu_seconds()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except subprocess.TimeoutExpired:
            return {**who, "status": "timed_out", "error": f"no result within {timeout:.0f} s",
                    "process_seconds": round(time.time() - t0, 1)}
        result_file = Path(spec["result_file"])
        if proc.returncode == 0 and result_file.is_file():
            result = json.loads(result_file.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            oom = any(w in " ".join(tail).lower() for w in _OOM_WORDS)
            result = {**who, "status": "out_of_memory" if oom else "failed", "returncode": proc.returncode,
                      "error": " | ".join(tail)[-600:]}
        result["process_seconds"] = round(time.time() - t0, 1)
        result["process_cpu_seconds"] = round(_children_cpu_seconds() - cpu0, 1)
        return result


def _children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def parse_lengths(text: str, flag: str = "--lengths") -> tuple:
    """'256,512' -> (256, 512); anything else is a UserError naming the flag."""
    from esmfold_peft.runtime.errors import UserError

    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise UserError(f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. 256,512")
    return lengths
