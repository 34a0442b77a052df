"""Benchmark: peak memory and time of one long-sequence prediction, with and without each memory saving.

The model is `configs/paper_d4.py` (12 trunk blocks, c_s 1024, c_z 128) with a randomly initialised
35M-shaped ESM-2 and a LoRTA r=8 adapter (random nonzero factors) merged into it, as
bench/predict_throughput.py builds it. One prediction is one call of
`esmfold_peft.fold.predict.predict_sequences` on one random sequence: eval mode, `torch.no_grad()`,
float32 trunk, 0 recycles (one trunk pass) unless `--recycles`, atom37 conversion included.

Variants (each on its own or all together):
  * `none`      no saving: trunk unchunked, fair-esm's LM attention, float32 LM;
  * `chunk 64`  the trunk's triangular attention in chunks of 64 rows (`model.trunk.chunk_size=64`,
                what fair-esm's `trunk.set_chunk_size(64)` and `esm-fold --chunk-size 64` set);
  * `SDPA`      the LM's attention through scaled_dot_product_attention (`model.lm.sdpa=True`);
  * `bf16 LM`   the frozen LM stored in bf16 and run under bf16 autocast (`model.lm.storage_dtype=bfloat16`);
  * `all`       the three together.

Every (length, variant) cell runs in a fresh process, so its peak RSS is its own, under an
address-space limit (`--memory-limit-gib`, default 16: the issue's target of 1,000 residues within
16 GB). A cell that needs more fails at the allocation that crosses the limit, and that failure is
the result ("out of memory", with the phase where it happened); the limit also keeps the cell from
pushing a shared machine into its OOM killer. Address space counts more than RSS (libraries and
reserved arenas, recorded as `vm_baseline_bytes`), so the limit is conservative by that much.

Memory, per cell: `peak tensor` = bytes the model holds (all of it, `resident`) + the highest amount
of tensor storage allocated during the call (bench/common.py's TensorMemoryTracker: live tensor
bytes, no allocator caching); `peak RSS` = the process's high-water mark (`ru_maxrss`), what the
machine must actually have. Per phase (LM, trunk, structure module and heads) the tracked peak
says where the peak is. Time: the one measured call (after a 16-residue warm-up), wall and
process-CPU seconds; the tracker costs some Python per op, the same in every variant.

Depth. In eval mode the trunk's 12 blocks are identical in shape and cost, and each frees the
previous one's activations, so the peak is reached inside any one block. On CPU the full trunk at
1,024 residues takes about an hour per cell, so by default (`--blocks-run 1` on CPU) each cell keeps
all 12 blocks' weights in memory (in `resident` and in the RSS) but runs only the first one: the
peak memory is the full model's, the time is measured for one block and reported for 12 as
`measured + 11 × that block's time` (an estimate, labelled as such). `--blocks-run 0` runs all 12.

    python bench/predict_memory.py                  # CPU: the default grid (DEFAULTS), 13.5 min measured on 2 shared cores
    python bench/predict_memory.py --lengths 1024 --variants "chunk 64"        # one more cell
    python bench/predict_memory.py --blocks-run 0 --lengths 256                 # the whole trunk, every variant
    python bench/predict_memory.py --smoke          # tiny trunk, 16 residues, none and all (~30 s)
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from common import (GiB, MiB, TensorMemoryTracker, base_parser, child_main, clock_for, finish, load_average,
                    merge_random_adapter, parse_lengths, pick_device, resident_bytes, run_child, set_threads,
                    synchronize)
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.errors import UserError
from esmfold_peft.adapters import is_adapter_param

VARIANTS = {  # name -> (trunk chunk size, LM SDPA, LM storage dtype)
    "none": (None, False, "float32"),
    "chunk 64": (64, False, "float32"),
    "SDPA": (None, True, "float32"),
    "bf16 LM": (None, False, "bfloat16"),
    "all": (64, True, "bfloat16"),
}
BASELINE = "none"
SMOKE_CHUNK = 4  # the tiny trunk's chunk size: smaller than the smoke lengths, so chunking happens
ALL = tuple(VARIANTS)
# length -> variants run by default. On CPU every cell runs one trunk block (~10 s at 256, ~55 s at 512,
# ~5 min at 1,024 on one core), so the grid keeps ~10 min: each saving alone where it is cheap (256),
# and at the long lengths the two ends, none and all, plus chunking alone at 512. `--lengths` or
# `--variants` run their full product instead.
DEFAULTS = {"cpu": dict(grid={256: ALL, 512: ("none", "chunk 64", "all"), 1024: ("none", "all")}, blocks_run=1,
                        recycles=0),
            "cuda": dict(grid={L: ALL for L in (256, 512, 1024, 2048)}, blocks_run=0, recycles=0)}
SMOKE = dict(grid={16: ("none", "all")}, blocks_run=0, recycles=0)


# --- one cell, in its own process --------------------------------------------------------------------

class PhaseTracker(TensorMemoryTracker):
    """TensorMemoryTracker that also keeps the peak of live tensor bytes per named phase."""

    def __init__(self):
        super().__init__()
        self.phase = "before"
        self.phase_peak = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.current > self.phase_peak.get(self.phase, -1):
            self.phase_peak[self.phase] = self.current
        return out


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def build_model(variant: str, smoke: bool, seed: int):
    from esmfold_peft.fold.model.build import build_model as build

    from fold_step import fold_config

    chunk, sdpa, storage = VARIANTS[variant]
    cfg = fold_config(smoke)  # paper_d4, random 35M-shaped LM, LoRTA r=8 (smoke: tiny trunk, 8M-shaped LM)
    cfg.model.trunk.chunk_size = (SMOKE_CHUNK if smoke else chunk) if chunk else None
    cfg.model.lm.sdpa = sdpa
    cfg.model.lm.storage_dtype = storage  # read by esmfold_peft.fold.model.lm.load_language_model
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
        model = build(cfg)
    merge_random_adapter(model, seed)
    return model.eval(), cfg


def _phase_hooks(model, tracker: PhaseTracker, device, clock, marks: dict, blocks: list):
    """Forward hooks that name the phase (LM, trunk, structure module and heads), mark when each starts
    and time each trunk block, on `clock`."""
    def now():
        synchronize(device)
        return clock()

    def enter(name):
        def hook(*_):
            tracker.phase = name
            marks.setdefault(name, now())
        return hook

    handles = [model.esm.register_forward_pre_hook(enter("lm")),
               model.esm.register_forward_hook(enter("trunk")),
               model.trunk.structure_module.register_forward_pre_hook(enter("structure module and heads"))]
    for block in model.trunk.blocks:
        handles += [block.register_forward_pre_hook(lambda *_: blocks.append(-now())),
                    block.register_forward_hook(lambda *_: blocks.__setitem__(-1, blocks[-1] + now()))]
    return handles


def run_cell(spec: dict) -> dict:
    """Build the variant's model, predict one sequence of `spec['length']`, measure (in this process)."""
    from esmfold_peft.fold.predict import is_out_of_memory, predict_sequences
    from predict_throughput import random_sequence

    device = torch.device(spec["device"])
    vm_start = _status_kib("VmSize") * 1024
    model, cfg = build_model(spec["variant"], spec["smoke"], spec["seed"])
    model.to(device)
    resident = resident_bytes(model)  # every block's weights, also those not run below
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.esm.named_parameters() if not is_adapter_param(n))
    full_blocks = len(model.trunk.blocks)
    k = spec["blocks_run"] or full_blocks
    all_blocks = model.trunk.blocks
    # as bench/common.py: process CPU seconds for a single-threaded CPU run (other processes' time slices
    # do not count), wall seconds otherwise
    clock_name = clock_for(device)
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    out = {"variant": spec["variant"], "length": spec["length"], "trunk_blocks": full_blocks, "blocks_run": k,
           "resident_bytes": resident, "lm_parameter_bytes": lm_bytes, "clock": clock_name,
           "chunk_size": cfg.model.trunk.chunk_size, "sdpa": bool(cfg.model.lm.sdpa),
           "storage_dtype": cfg.model.lm.storage_dtype, "vm_baseline_bytes": vm_start}
    predict_sequences(model, [random_sequence(16, spec["seed"])], device, spec["recycles"])  # warm-up
    synchronize(device)
    out["rss_before_bytes"] = _status_kib("VmRSS") * 1024
    sequence = random_sequence(spec["length"], spec["seed"])
    tracker, marks, block_times = PhaseTracker(), {}, []
    if k < full_blocks:
        model.trunk.blocks = torch.nn.ModuleList(list(all_blocks)[:k])  # the rest stay alive in `all_blocks`
    handles = _phase_hooks(model, tracker, device, clock, marks, block_times)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    t0, c0, k0 = time.perf_counter(), time.process_time(), clock()
    try:
        with tracker:
            predict_sequences(model, [sequence], device, spec["recycles"])
        synchronize(device)
        out["status"] = "ok"
    except Exception as exc:  # an allocation beyond the limit is a result
        if not is_out_of_memory(exc):
            raise
        out["status"] = "out_of_memory"
        out["error"] = str(exc).splitlines()[0][:300]
        out["failed_in_phase"] = tracker.phase
    finally:
        for h in handles:
            h.remove()
        model.trunk.blocks = all_blocks
    wall, cpu, seconds = time.perf_counter() - t0, time.process_time() - c0, clock() - k0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["vm_peak_bytes"] = _status_kib("VmPeak") * 1024
    if out["status"] != "ok":
        out["tracked_peak_bytes_before_failure"] = resident + tracker.peak
        out["seconds_until_failure"] = seconds
        return out
    out["seconds"] = seconds
    out["wall_seconds"] = wall
    out["cpu_seconds"] = cpu
    out["peak_tensor_bytes"] = resident + tracker.peak
    out["phase_peak_tensor_bytes"] = {p: resident + b for p, b in tracker.phase_peak.items() if p != "before"}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - cuda_before + resident
    out["block_seconds"] = block_times
    per_block = sum(block_times) / len(block_times) if block_times else 0.0
    out["seconds_full_depth_estimate"] = seconds + (full_blocks - k) * per_block
    if {"lm", "trunk", "structure module and heads"} <= set(marks):
        out["phase_seconds"] = {"before the lm": marks["lm"] - k0, "lm": marks["trunk"] - marks["lm"],
                                "trunk": marks["structure module and heads"] - marks["trunk"],
                                "structure module and heads": k0 + seconds - marks["structure module and heads"]}
    return out


def _gib(b) -> str:
    return "–" if b is None else f"{b / GiB:.2f}"


def _cell_row(c: dict, limit_gib: float) -> list:
    status = c["status"]
    if status != "ok":
        where = c.get("failed_in_phase")
        what = {"out_of_memory": f"out of memory (> {limit_gib:g} GiB address space)" if limit_gib > 0
                else "out of memory", "timed_out": "timed out", "failed": "failed"}[status]
        return [c["length"], c["variant"], what + (f" in {where}" if where else ""), "–", "–", "–", "–",
                _gib(c.get("peak_rss_bytes")), "–", "–", "–"]
    ph = c.get("phase_peak_tensor_bytes", {})
    k, full = c["blocks_run"], c["trunk_blocks"]
    est = c["seconds_full_depth_estimate"]
    return [c["length"], c["variant"], "ok", _gib(c["peak_tensor_bytes"]), _gib(ph.get("lm")), _gib(ph.get("trunk")),
            _gib(ph.get("structure module and heads")), _gib(c["peak_rss_bytes"]),
            "–" if "phase_seconds" not in c else f"{c['phase_seconds']['lm']:.1f}",
            f"{c['seconds']:.1f}" + ("" if k == full else f" ({k}/{full} blocks)"),
            f"{est:.0f}" + (" (est.)" if k < full else "")]


def tables(r) -> list:
    limit = r["config"]["memory_limit_gib"]
    m = r["model"]
    rows = [_cell_row(c, limit) for c in r["cells"]]
    k, full = r["config"]["blocks_run"] or m["trunk_blocks"], m["trunk_blocks"]
    depth = (f"all {full} blocks' weights resident, {k} block(s) run: the peak is the full model's (each block "
             f"frees the previous one's activations); the {full}-block time is measured + {full - k} × the run "
             "block's time (est.)" if k < full else f"all {full} trunk blocks run")
    t1 = {"title": f"Prediction memory: {m['config']} ({full} trunk blocks, c_s {m['c_s']}, c_z {m['c_z']}, "
                   f"{m['lm']}), merged LoRTA r=8, batch 1, {r['config']['recycles']} recycles, {r['device']}",
          "columns": ["length", "savings", "status", "peak tensor GiB", "LM phase GiB", "trunk phase GiB",
                      "SM + heads GiB", "peak RSS GiB", "LM s", "s measured", f"s, {full} blocks"],
          "rows": rows,
          "notes": [f"One prediction per cell, each in a fresh process under a {limit:g} GiB address-space limit "
                    "(0 = none); peak tensor = model (resident) + highest live tensor bytes during the call "
                    "(TorchDispatchMode tracker, phases likewise); peak RSS = the process's high-water mark. "
                    f"Savings: chunk 64 = model.trunk.chunk_size 64; SDPA = model.lm.sdpa; bf16 LM = "
                    f"model.lm.storage_dtype bfloat16; none = none of them. Seconds: "
                    f"{'process CPU seconds (one thread)' if r['clock'] == 'cpu' else 'wall seconds'}, one "
                    f"call, with the tracker's per-op cost; LM s: the language model's forward alone. {depth}."]}
    rows2 = []
    by = {(c["length"], c["variant"]): c for c in r["cells"]}
    for length in r["config"]["lengths"]:
        base = by.get((length, BASELINE))
        for v in VARIANTS:
            c = by.get((length, v))
            if c is None or v == BASELINE:
                continue
            ok = c["status"] == "ok"
            base_ok = base is not None and base["status"] == "ok"
            rows2.append([length, v,
                          f"{c['peak_tensor_bytes'] / base['peak_tensor_bytes']:.3f}" if ok and base_ok else
                          ("fits, none does not" if ok else "–"),
                          f"{c['peak_rss_bytes'] / base['peak_rss_bytes']:.3f}" if ok and base_ok else "–",
                          f"{c['seconds_full_depth_estimate'] / base['seconds_full_depth_estimate']:.2f}"
                          if ok and base_ok else "–"])
    t2 = {"title": "Prediction memory: each saving against none (ratios; < 1 saves)",
          "columns": ["length", "savings", "peak tensor / none", "peak RSS / none", "time / none"],
          "rows": rows2 or [["–", "–", "–", "–", "–"]],
          "notes": ["Time ratios from single measurements (no repeats): differences of a few % are noise."]}
    target = r["target"]
    rows3 = [[v, target["length"], ("yes" if t["fits"] else "no"), _gib(t.get("peak_rss_bytes")),
              _gib(t.get("peak_tensor_bytes"))] for v, t in target["variants"].items()]
    within = f"{target['limit_gib']:g} GiB" if target["limit_gib"] else "the device's memory"
    t3 = {"title": f"Target: {target['length']} residues within {within}",
          "columns": ["savings", "length", f"fits in {within}", "peak RSS GiB", "peak tensor GiB"],
          "rows": rows3 or [["–", "–", "–", "–", "–"]],
          "notes": ["Fits = the prediction finished under the address-space limit and its peak RSS is within it."]}
    return [t1, t2, t3]


def _main(argv=None) -> int:
    if child_main(run_cell):  # a cell, in its own process (bench/common.py)
        return 0
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", default="", help="comma-separated lengths (default 256,512,1024)")
    p.add_argument("--variants", default="", help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--blocks-run", type=int, default=-1,
                   help="trunk blocks to run, all kept in memory (0: all; default 1 on CPU, 0 on CUDA)")
    p.add_argument("--recycles", type=int, default=-1, help="extra trunk passes (default 0)")
    p.add_argument("--memory-limit-gib", type=float, default=16.0,
                   help="address-space limit of each cell's process (0: none)")
    p.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds before a cell is given up")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = dict(SMOKE if args.smoke else DEFAULTS[device.type])
    grid = dict(conf.pop("grid"))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.lengths or variants:  # the full product of what was asked for
        lengths = parse_lengths(args.lengths) if args.lengths else tuple(grid)
        grid = {L: tuple(variants or ALL) for L in lengths}
    if args.blocks_run >= 0:
        conf["blocks_run"] = args.blocks_run
    if args.recycles >= 0:
        conf["recycles"] = args.recycles
    limit = 0.0 if device.type == "cuda" else args.memory_limit_gib  # the GPU's memory is its own limit
    conf.update(lengths=tuple(grid), grid={str(L): list(vs) for L, vs in grid.items()}, memory_limit_gib=limit,
                chunk_size=SMOKE_CHUNK if args.smoke else 64)
    from fold_step import fold_config

    cfg = fold_config(args.smoke)
    cells = []
    print(f"{cfg.name}{' (smoke: tiny trunk)' if args.smoke else ''}, cells {conf['grid']}, blocks run "
          f"{conf['blocks_run'] or 'all'}, limit {limit:g} GiB, {device}", flush=True)
    for length, length_variants in grid.items():
        for v in length_variants:
            spec = dict(variant=v, length=length, smoke=args.smoke, seed=args.seed, device=device.type,
                        blocks_run=conf["blocks_run"], recycles=conf["recycles"], memory_limit_gib=limit,
                        threads=torch.get_num_threads())
            c = run_child(Path(__file__), spec, args.cell_timeout, keys=("variant", "length"))
            cells.append(c)
            if c["status"] == "ok":
                print(f"  L={length} {v}: peak tensor {c['peak_tensor_bytes'] / MiB:,.0f} MiB, peak RSS "
                      f"{c['peak_rss_bytes'] / MiB:,.0f} MiB, {c['seconds']:.1f} s ({c['process_seconds']} s "
                      f"with build)", flush=True)
            else:
                print(f"  L={length} {v}: {c['status']}: {c.get('error', '')[:200]}", flush=True)
    longest = max(conf["lengths"])
    target = {"length": longest, "limit_gib": limit, "variants": {}}
    for c in cells:
        if c["length"] == longest:
            fits = c["status"] == "ok" and (not limit or c["peak_rss_bytes"] <= limit * GiB)
            target["variants"][c["variant"]] = {"fits": fits, "status": c["status"],
                                                "peak_rss_bytes": c.get("peak_rss_bytes"),
                                                "peak_tensor_bytes": c.get("peak_tensor_bytes")}
    result = {"config": {**conf, "lengths": list(conf["lengths"])}, "device": str(device), "clock": clock_for(device),
              "model": {"config": cfg.name + (" (smoke: tiny trunk)" if args.smoke else ""),
                        "lm": cfg.model.lm.name + " (random init)", "trunk_blocks": cfg.model.trunk.num_blocks,
                        "c_s": cfg.model.trunk.sequence_state_dim, "c_z": cfg.model.trunk.pairwise_state_dim},
              "cells": cells, "target": target}
    result["tables"] = tables(result)
    # on CPU the default runs 1 block; a run of every block checks that estimate and is kept beside it
    full_depth_on_cpu = device.type == "cpu" and not args.smoke and conf["blocks_run"] in (0, cfg.model.trunk.num_blocks)
    finish("predict_memory_full_depth" if full_depth_on_cpu else "predict_memory", args, device, started, load_before,
           result)
    return 0


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_predict_memory(d: dict) -> tuple[list, str]:
    t = d["target"]
    cells = d["cells"]
    by = {(c["length"], c["variant"]): c for c in cells}
    limit = f"{t['limit_gib']:g} GiB" if t["limit_gib"] else "the device's memory"
    targets = []
    fitting = [v for v, x in t["variants"].items() if x["fits"]]
    best = min((x for x in t["variants"].values() if x["fits"]), key=lambda x: x["peak_rss_bytes"], default=None)
    targets.append([f"{t['length']} residues within {limit}, some saving", "fits",
                    f"{', '.join(fitting) or 'none fits'}"
                    + (f" (peak RSS {best['peak_rss_bytes'] / 2 ** 30:.2f} GiB)" if best else ""),
                    "met" if fitting else "missed"])
    failed = [f"{c['variant']} at {c['length']} ({c['status'].replace('_', ' ')}"
              + (f" in the {c['failed_in_phase']}" if c.get("failed_in_phase") else "") + ")"
              for c in cells if c["status"] != "ok"]
    parts = []
    for (length, v), c in sorted(by.items()):
        if c["status"] == "ok" and v != "none" and (length, "none") in by and by[(length, "none")]["status"] == "ok":
            parts.append(f"{v} at {length}: {c['peak_tensor_bytes'] / by[(length, 'none')]['peak_tensor_bytes']:.2f}")
    k = d["config"]["blocks_run"] or d["model"]["trunk_blocks"]
    depth = ("" if k == d["model"]["trunk_blocks"] else
             f" Each cell kept all {d['model']['trunk_blocks']} trunk blocks in memory but ran {k} (the peak is reached "
             "inside any one block; the full-depth time is an estimate).")
    return targets, (
        "Inference keeps no activations for backward, so the peak is the largest transient of one step: in the "
        "trunk, triangular attention's heads·L³ scores (16 GiB in float32 at 1,024 residues), which chunking "
        "splits into pieces of 64 rows; the LM's savings (SDPA, bf16 storage) act on the language model only, "
        "a small part of the peak with a 35M LM. Peak tensor bytes against none: " + (", ".join(parts) or "–")
        + ". " + (("Did not fit: " + "; ".join(failed) + ".") if failed else "Every cell fit.") + depth)


def read_predict_memory_full_depth(d: dict, siblings: dict) -> tuple[list, str]:
    """Section 6b: predict_memory.py with every trunk block run (`--blocks-run 0`) against section 6's
    estimate from one block. Shows its own comparison table in place of the run's tables (which repeat
    section 6's layout); renders whatever cells the run has."""
    one = siblings.get("predict_memory")  # the same machine's section 6 run
    est = {(c["length"], c["variant"]): c for c in (one["cells"] if one else ()) if c["status"] == "ok"}
    one_k = one and (one["config"]["blocks_run"] or one["model"]["trunk_blocks"])
    gib = 2 ** 30
    rows, ratios, peaks, spreads = [], [], [], []
    for c in d["cells"]:
        e = est.get((c["length"], c["variant"]))
        if c["status"] != "ok":
            rows.append([c["length"], c["variant"], c["status"].replace("_", " ")] + ["–"] * 6)
            continue
        b = c.get("block_seconds") or []
        full = c["seconds"]
        r = full / e["seconds_full_depth_estimate"] if e else None
        pk = c["peak_tensor_bytes"] / e["peak_tensor_bytes"] if e else None
        if r is not None:
            ratios.append(f"{r:.2f} at {c['length']}")
            peaks.append(pk)
        if b:
            spreads.append(f"{min(b):.1f}–{max(b):.1f} s at {c['length']}")
        rows.append([c["length"], c["variant"], f"{full:.0f}",
                     f"{min(b):.1f}–{max(b):.1f}" if b else "–",
                     f"{e['seconds_full_depth_estimate']:.0f}" if e else "–",
                     "–" if r is None else f"{r:.2f}",
                     f"{c['peak_tensor_bytes'] / gib:.2f}" + (f" / {e['peak_tensor_bytes'] / gib:.2f}" if e else ""),
                     f"{c['peak_rss_bytes'] / gib:.2f}" + (f" / {e['peak_rss_bytes'] / gib:.2f}" if e else ""),
                     "–" if pk is None else f"{pk:.3f}"])
    blocks = d["model"]["trunk_blocks"]
    clock = "process CPU seconds (one thread)" if d.get("clock") == "cpu" else "wall seconds"
    d["tables"] = [{  # in place of the run's own tables
        "title": f"Prediction at full depth: all {blocks} trunk blocks run, against section 6's estimate "
                 f"({one_k or '–'} block(s) run)",
        "columns": ["length", "savings", f"s, {blocks} blocks measured", "s per block, min–max", f"s, {blocks} blocks, section 6 est.",
                    "measured / estimate", "peak tensor GiB, full / sec. 6", "peak RSS GiB, full / sec. 6",
                    "peak tensor full / sec. 6"],
        "rows": rows or [["–"] * 9],
        "notes": [f"One prediction per cell in a fresh process, as section 6 ({d['config']['recycles']} recycles, "
                  f"{d['config']['memory_limit_gib']:g} GiB address-space limit); seconds: {clock}, one call each, "
                  "with the memory tracker's per-op cost. Section 6's estimate = its measured call with "
                  f"{one_k or '–'} block(s) + the remaining blocks × the run block's time, from a different run "
                  "(another process, at another time on the shared machine)."]}]
    if not d["cells"] or one is None:
        return [], ("All trunk blocks run." + ("" if one else " No section 6 run on this machine to compare with."))
    text = (f"Section 6 runs {one_k} of the {blocks} trunk blocks and reports the full-depth time as an estimate; "
            f"here all {blocks} run. Measured / estimate: {', '.join(ratios) or '–'}.")
    if spreads:
        text += (f" The estimate assumes every block costs what the first does (the same shapes in each); the "
                 f"blocks' own times span {'; '.join(spreads)}.")
    if peaks:
        span = f"{min(peaks):.3f}" + ("" if f"{min(peaks):.3f}" == f"{max(peaks):.3f}" else f"–{max(peaks):.3f}")
        text += (f" Peak tensor bytes full depth / section 6: {span} (each block frees "
                 "the previous one's activations, so the peak is reached inside one block).")
    return [], text


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "predict_memory": ("6. Long sequences: prediction memory", read_predict_memory),
    "predict_memory_full_depth": ("6b. Prediction at full depth", read_predict_memory_full_depth),
}


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
