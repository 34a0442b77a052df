"""Benchmark: ESM-2 attention through SDPA against fair-esm's own attention, against sequence length.

One forward + backward (loss: mean of the final representation) of a randomly initialised ESM-2
with a LoRTA r=8 adapter (base frozen, as in fine-tuning), batch 1, for two variants on ONE model:
`original` (fair-esm's `MultiheadAttention.forward`, which keeps the (heads·L)×L scores and
probabilities for backward) and `sdpa` (esmfold_peft/fold/model/esm_attention.py, fused
`scaled_dot_product_attention`). The variants are interleaved (bench/common.py); memory is one
step's peak. Both variants' final representations are compared, so a number here is never a
number of a different function.

Shapes keep ESM-2's true width and heads (35M: 480, 20 heads, 12 layers; 650M: 1280, 20 heads,
33 layers). Every (shape, layers, length) cell runs in a fresh process under an address-space limit
(`--memory-limit-gib`, CPU only), so a variant that needs more memory is recorded as "out of
memory" and the other is still measured. On CPU (2 cores, 23 GiB) 35M runs all 12 layers from 256
to 2,048 residues; 650M runs 3 of its 33 layers at those lengths (all 33 with the original
attention at 2,048 residues would hold about 11 × the 3-layer run's 2 GiB of activations) and all
33 at 256. Every layer has the same shape, so SDPA changes each layer's activations alike; a run
with fewer layers also counts a part that does not grow with depth, which the 3- and 33-layer runs
at 256 measure. On CUDA every shape runs all its layers, with bf16 autocast.

    python bench/esm_attention.py                          # the device's default cells (CPU: 38 min wall on 2 shared cores)
    python bench/esm_attention.py --shapes 35M --lengths 256,512
    python bench/esm_attention.py --shapes 650M --layers 6 --lengths 1024
    python bench/esm_attention.py --smoke                  # tiny shape, seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from common import (autocast, base_parser, child_main, clock_for, finish, fmt_mib, fmt_ms, fmt_ratio, interleaved,
                    load_average, mib_text, parse_lengths, peak_memory, pick_device, ratio_summary, resident_bytes,
                    run_child, run_conf, set_threads, summary)
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.errors import UserError

# name -> ((layers, d, heads), {device kind: {layers run: lengths}})
SHAPES = {
    "35M": ((12, 480, 20), {"cpu": {12: (256, 512, 1024, 2048)}, "cuda": {12: (256, 512, 1024, 2048)}}),
    "650M": ((33, 1280, 20), {"cpu": {33: (256,), 3: (256, 512, 1024, 2048)},
                              "cuda": {33: (256, 512, 1024, 2048)}}),
}
SMOKE_SHAPES = {"tiny": ((2, 64, 4), {"cpu": {2: (32,)}, "cuda": {2: (32,)}})}  # one cell: one process start
VARIANTS = ("original", "sdpa")
DEFAULTS = {"cpu": dict(repeats=3, steps=1, warmup=1), "cuda": dict(repeats=5, steps=3, warmup=2)}
RANK = 8
MEMORY_LIMIT_GIB = 12.0  # CPU: each cell's address space; 35M's original attention at 2,048 holds 5.3 GiB


def build_lm(n_layers: int, d: int, heads: int, device: torch.device, seed: int):
    import esm

    from esmfold_peft.adapters import LoRTAConfig, add_adapter

    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=n_layers, embed_dim=d, attention_heads=heads).to(device)
    add_adapter(model, LoRTAConfig(rank=RANK, alpha=RANK))  # base frozen, adapter trainable
    with torch.no_grad():  # a nonzero update, as after some training
        model.peft.get().B.normal_(0, 0.02)
    return model.train()


def random_tokens(model, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    al = model.alphabet
    aa = torch.tensor([al.get_idx(c) for c in "ACDEFGHIKLMNPQRSTVWY"])
    toks = aa[torch.randint(0, 20, (1, length), generator=g)]
    toks[:, 0], toks[:, -1] = al.cls_idx, al.eos_idx
    return toks.to(device)


def make_steps(model, inputs: dict, device: torch.device, bf16: bool):
    """{variant: one forward + backward}; each switches the model's attention first (a dict lookup per layer)."""
    from esmfold_peft.fold.model.esm_attention import disable_sdpa, enable_sdpa

    last = model.num_layers
    switch = {"original": disable_sdpa, "sdpa": enable_sdpa}
    final = {}

    def step(name):
        def run():
            switch[name](model)
            try:
                with autocast(device, bf16):
                    rep = model(inputs["tokens"], repr_layers=[last])["representations"][last]
                rep.float().mean().backward()
                final[name] = rep.detach()
            finally:
                for p in model.parameters():
                    p.grad = None
        return run

    return {name: step(name) for name in VARIANTS}, final


# --- one cell, in its own process --------------------------------------------------------------------

def run_cell(spec: dict) -> dict:
    """Build the shape at spec['layers'] layers, then time and measure both variants at spec['length'].

    The first warm-up step of each variant doubles as a probe: a variant that runs out of memory there is
    recorded as such and the other variant is measured alone."""
    from esmfold_peft.fold.predict import is_out_of_memory  # now: importing after a failure may itself fail

    device, conf, bf16, length = torch.device(spec["device"]), spec["conf"], spec["bf16"], spec["length"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_lm(spec["layers"], spec["d_model"], spec["heads"], device, spec["seed"])
    inputs = {"tokens": random_tokens(model, length, device, spec["seed"])}
    steps, final = make_steps(model, inputs, device, bf16)
    out = {"tokens": length, "status": "ok", "variants": {}}
    for name in VARIANTS:  # probe = first warm-up step
        try:
            steps[name]()
        except Exception as exc:  # an allocation beyond the limit is a result
            if not is_out_of_memory(exc):
                raise
            out["variants"][name] = {"status": "out_of_memory", "error": str(exc).splitlines()[0][:300]}
            final.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ok = {name: fn for name, fn in steps.items() if name not in out["variants"]}
    if len(ok) < len(VARIANTS):
        out["status"] = "out_of_memory" if not ok else "partial"
    if not ok:
        return out
    times = interleaved(ok, conf["repeats"], conf["steps"], device, warmup=conf["warmup"] - 1, seed=spec["seed"])
    resident = resident_bytes(model, inputs["tokens"])
    out["resident_bytes"] = resident
    for name, fn in ok.items():
        peak = peak_memory(fn, device, lambda: resident)
        out["variants"][name] = {"status": "ok", "seconds_per_step": summary(times[name]),
                                 "wall_seconds_per_step": summary(times[name + "@wall"]),
                                 "peak_bytes": peak, "transient_bytes": peak - resident}
    if len(ok) == len(VARIANTS):
        v = out["variants"]
        out["max_abs_diff_final_representation"] = (final["sdpa"].float() - final["original"].float()).abs().max().item()
        out["ratios"] = {"sdpa/original time": ratio_summary(times["sdpa"], times["original"]),
                         "sdpa/original peak memory": v["sdpa"]["peak_bytes"] / v["original"]["peak_bytes"],
                         "sdpa/original transient memory": (v["sdpa"]["transient_bytes"] / v["original"]["transient_bytes"]
                                                            if v["original"]["transient_bytes"] > 0 else None)}
    return out


# --- the parent: one process per cell ----------------------------------------------------------------

def plan(args, kind: str) -> list:
    """[(shape label, (layers_full, d, heads), layers run, lengths)] for this run."""
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in names if s not in shapes]
        if unknown:
            raise UserError(f"--shapes {args.shapes!r}: unknown shape(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(shapes)}")
        shapes = {k: shapes[k] for k in names}
    lengths = parse_lengths(args.lengths) if args.lengths else None
    groups = []
    for label, (dims, per_kind) in shapes.items():
        layer_groups = per_kind[kind]
        if args.layers:  # one layer count, every length the shape had (or --lengths)
            layer_groups = {args.layers: tuple(sorted({L for ls in layer_groups.values() for L in ls}))}
        for layers, ls in layer_groups.items():
            groups.append((label, dims, layers, lengths or ls))
    return groups


def _describe(cell: dict) -> str:
    if cell["status"] in ("timed_out", "failed"):
        return f"{cell['status']}: {cell.get('error', '')[:200]}"
    v = cell["variants"]
    parts = [f"{n} " + (f"{x['seconds_per_step']['median']:.2f} s, {fmt_mib(x['transient_bytes'])} MiB activations"
                        if x["status"] == "ok" else x["status"].replace("_", " ")) for n, x in v.items()]
    return "; ".join(parts) + f" ({cell['process_seconds']} s with build)"


def _cell_columns(m: dict, limit_gib: float) -> list:
    """The table's columns after shape, layers and length for one cell."""
    if m["status"] in ("timed_out", "failed") or (m["status"] == "out_of_memory" and not m.get("variants")):
        what = {"timed_out": "timed out", "failed": "failed", "out_of_memory": "out of memory"}[m["status"]]
        return [what] + ["–"] * 9
    oom = f"out of memory (> {limit_gib:g} GiB)" if limit_gib > 0 else "out of memory"
    o, s, q = m["variants"]["original"], m["variants"]["sdpa"], m.get("ratios")

    def col(x, fmt, key):
        return fmt(x[key]) if x["status"] == "ok" else (oom if key == "seconds_per_step" else "–")

    tq = q and q["sdpa/original transient memory"]
    return [col(o, fmt_ms, "seconds_per_step"), col(s, fmt_ms, "seconds_per_step"),
            fmt_ratio(q["sdpa/original time"]) if q else "–",
            col(o, fmt_mib, "peak_bytes"), col(s, fmt_mib, "peak_bytes"),
            f"{q['sdpa/original peak memory']:.3f}" if q else "–",
            col(o, fmt_mib, "transient_bytes"), col(s, fmt_mib, "transient_bytes"),
            f"{tq:.3f}" if tq else "–",
            f"{m['max_abs_diff_final_representation']:.1e}" if q else "–"]


def tables(results, device, conf, limit_gib: float) -> list:
    rows = []
    for r in results:
        for length, m in r["lengths"].items():
            rows.append([r["shape"], f"{r['layers']}/{r['layers_full']} × {r['d_model']}, {r['heads']}h", length]
                        + _cell_columns(m, limit_gib))
    mem_kind = "max_memory_allocated" if device.type == "cuda" else "live tensor bytes (dispatch-mode tracker)"
    prec = "bf16 autocast" if results and results[0]["bf16"] else "float32"
    partial = [f"{r['shape']} at {r['layers']}/{r['layers_full']} layers" for r in results
               if r["layers"] < r["layers_full"]]
    depth = (f" {', '.join(partial)}: the model keeps only those layers. Every layer has the same shape, so per "
             "layer the activations and time are the full model's; the totals also hold a part that does not grow "
             "with the layer count (embedding, head, the backward's own buffers), which the full model spreads "
             "over all its layers, so these rows' SDPA/original ratios understate the per-layer saving (compare "
             "the same shape's full-depth row)." if partial else "")
    limit = (f" Each cell runs in a fresh process limited to {limit_gib:g} GiB of address space; a variant that "
             "needs more is shown as out of memory." if limit_gib > 0 else " Each cell runs in a fresh process.")
    return [{"title": f"ESM-2 attention, SDPA vs fair-esm: forward + backward with LoRTA r={RANK}, batch 1",
             "columns": ["shape", "layers × width, heads", "length", "original ms/step", "SDPA ms/step",
                         "SDPA/original time", "original peak MiB", "SDPA peak MiB", "SDPA/original peak",
                         "original activations MiB", "SDPA activations MiB", "SDPA/original activations",
                         "max abs Δ, final repr."],
             "rows": rows,
             "notes": [f"{prec}; {conf['repeats']} interleaved rounds of {conf['steps']} step(s) after "
                       f"{conf['warmup']} warm-up step(s), median (min–max); time ratio: median of per-round "
                       f"ratios. Peak memory: {mem_kind}, one step = weights, adapter and input (resident) + "
                       "the highest amount allocated during the step (activations); the resident part is the "
                       "same for both variants. Random weights; max abs Δ: the two variants' final "
                       "representations." + limit + depth]}]


def _main(argv=None) -> int:
    if child_main(run_cell):  # a cell, in its own process (bench/common.py)
        return 0
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma-separated subset of " + ", ".join(SHAPES))
    p.add_argument("--lengths", default="", help="comma-separated lengths for every shape (default: per shape)")
    p.add_argument("--layers", type=int, default=0,
                   help="layers of every shape, at every length it has (0: the device's default per shape)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed measurement (0: the device's default)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps per variant, at least 1 (0: default)")
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA too")
    p.add_argument("--memory-limit-gib", type=float, default=MEMORY_LIMIT_GIB,
                   help=f"address-space limit of each cell's process on CPU (0: none; default {MEMORY_LIMIT_GIB:g})")
    p.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds before a cell is given up")
    args = p.parse_args(argv)
    if min(args.layers, args.repeats, args.steps, args.warmup) < 0:
        raise UserError("--layers, --repeats, --steps and --warmup take whole numbers ≥ 0 (0: the default)")
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    kind = device.type
    conf = run_conf(args, DEFAULTS[kind])
    groups = plan(args, kind)
    bf16 = kind == "cuda" and not args.no_bf16
    limit = 0.0 if kind == "cuda" else args.memory_limit_gib  # the GPU's memory is its own limit
    results = []
    for label, (layers_full, d, heads), layers, lengths in groups:
        print(f"shape {label}: {layers}/{layers_full} layers, d={d}, heads={heads}, LoRTA r={RANK}, batch 1, "
              f"lengths {', '.join(map(str, lengths))}", flush=True)
        per_length = {}
        for length in lengths:
            spec = dict(shape=label, layers=layers, d_model=d, heads=heads, length=length, conf=conf, bf16=bf16,
                        seed=args.seed, device=str(device), memory_limit_gib=limit, threads=torch.get_num_threads())
            cell = run_child(Path(__file__), spec, args.cell_timeout, keys=())
            cell.setdefault("tokens", length)
            per_length[str(length)] = cell
            q = cell.get("ratios")
            print(f"  L={length}: {_describe(cell)}" + (
                f"; SDPA/original time {q['sdpa/original time']['median']:.3f}, activations "
                f"{q['sdpa/original transient memory']:.3f}, max |diff| "
                f"{cell['max_abs_diff_final_representation']:.2e}" if q else ""), flush=True)
        results.append({"shape": label, "d_model": d, "heads": heads, "layers": layers, "layers_full": layers_full,
                        "batch": 1, "bf16": bf16, "lengths": per_length})
    finish("esm_attention", args, device, started, load_before,
           {"config": {**conf, "rank": RANK, "layers_override": args.layers or None, "memory_limit_gib": limit,
                       "cell_timeout_s": args.cell_timeout, "clock": clock_for(device)},
            "results": results, "tables": tables(results, device, conf, limit)})
    return 0


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_esm_attention(d: dict) -> tuple[list, str]:
    targets, parts, missing = [], [], []
    for r in d["results"]:
        label = r["shape"] + ("" if r["layers"] == r["layers_full"] else f" at {r['layers']}/{r['layers_full']} layers")
        both = {L: m for L, m in r["lengths"].items() if m.get("ratios")}
        for L, m in r["lengths"].items():
            if not m.get("ratios"):
                gone = [n for n, v in m.get("variants", {}).items() if v["status"] != "ok"]
                missing.append(f"{label}, L={L}: " + (", ".join(gone) + " out of memory" if gone
                                                     else m["status"].replace("_", " ")))
        if not both:
            continue
        longest = list(both)[-1]
        q = both[longest]["ratios"]["sdpa/original transient memory"]
        targets.append([f"SDPA/original activation memory, {label}, L={longest}", "< 1",
                        "–" if q is None else f"{q:.3f}", "met" if q is not None and q < 1 else "missed"])
        parts.append(f"{label}: " + ", ".join(
            f"L={L} time {fmt_ratio(m['ratios']['sdpa/original time'])}, activations "
            + ("–" if m["ratios"]["sdpa/original transient memory"] is None
               else f"{m['ratios']['sdpa/original transient memory']:.2f}") for L, m in both.items()))
    diffs = [m["max_abs_diff_final_representation"] for r in d["results"] for m in r["lengths"].values()
             if m.get("ratios")]
    per_layer = []  # the same shape and length at two depths: the difference is (layers apart) × one layer
    for lo in d["results"]:
        for hi in d["results"]:
            if lo["shape"] != hi["shape"] or lo["layers"] >= hi["layers"]:
                continue
            for L in set(lo["lengths"]) & set(hi["lengths"]):
                a, b = lo["lengths"][L], hi["lengths"][L]
                if not (a.get("ratios") and b.get("ratios")):
                    continue
                n = hi["layers"] - lo["layers"]
                act = {v: (b["variants"][v]["transient_bytes"] - a["variants"][v]["transient_bytes"]) / n
                       for v in ("original", "sdpa")}
                sec = {v: (b["variants"][v]["seconds_per_step"]["median"]
                           - a["variants"][v]["seconds_per_step"]["median"]) / n for v in ("original", "sdpa")}
                if act["original"] > 0 and sec["original"] > 0:
                    per_layer.append(
                        f"{lo['shape']} at L={L}, from its {lo['layers']}- and {hi['layers']}-layer rows: activations "
                        f"{mib_text(act['original'])} → {mib_text(act['sdpa'])} ({act['sdpa'] / act['original']:.2f}), time "
                        f"{sec['original'] * 1e3:.0f} → {sec['sdpa'] * 1e3:.0f} ms ({sec['sdpa'] / sec['original']:.2f}; "
                        "medians of separate runs)")
    return targets, (
        "fair-esm's attention keeps, in every layer, the scores and probabilities ((heads·L)×L each) for backward; "
        "SDPA keeps O(L) per head. The activations saved therefore grow with L², and SDPA/original falls with "
        "length (the rest of a layer's activations grow with L only). SDPA/original: " + ("; ".join(parts) or "–")
        + "." + (f" Per layer (difference of two depths ÷ the layers between them): {'; '.join(per_layer)}; a run "
                 "with fewer layers than the model also counts, in both variants, a part that does not grow with "
                 "depth, so its ratios understate the per-layer saving." if per_layer else "")
        + (f" Not measured: {'; '.join(missing)}." if missing else "")
        + (f" Both variants compute the same function (largest difference in the final representations "
           f"{max(diffs):.1e})." if diffs else ""))


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "esm_attention": ("5. Long sequences: ESM-2 attention through SDPA", read_esm_attention),
}


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
