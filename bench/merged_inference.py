"""Benchmark 2: inference cost of an adapted language model, merged and unmerged, against the base.

Four copies of one randomly initialised ESM-2-shaped model (same seed, same weights): the base
model alone; the base with LoRTA r=8 merged into its weights (`get_adapter_set(model).merge()`:
the hooks are removed, so the model runs the base code with other numbers in its weights); the same
LoRTA r=8 unmerged (applied by hooks at every forward); LoRA r=8 unmerged. Adapters get random
nonzero factors (a trained adapter), so merging really changes the weights. Forward passes under
`torch.no_grad()` in eval mode, interleaved; the ratios over the base are computed per round.

    python bench/merged_inference.py [--smoke]
"""

from __future__ import annotations

import time

import torch

from adapter_step import SHAPES, SMOKE_SHAPES, build_lm, random_tokens, shape_dims
from common import (SMOKE_RUNS, autocast, base_parser, finish, fmt_ms, fmt_ratio, interleaved, load_average,
                    pick_device, ratio_summary, run_conf, set_threads, summary)
from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set

BASE = "base"
VARIANTS = ("base", "LoRTA r=8 merged", "LoRTA r=8 unmerged", "LoRA r=8 unmerged")
DEFAULTS = {"cpu": dict(repeats=7, steps=1, warmup=1, best_of=2),
            "cuda": dict(repeats=20, steps=10, warmup=5, best_of=1)}


def randomize(adapter, seed: int) -> None:
    """Nonzero factors of a realistic size (the update is a few percent of the weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_((torch.rand(p.shape, generator=g) - 0.5).to(p.device, p.dtype) * 0.2)


def run_shape(label, spec, dims, device, args, conf, bf16):
    full_layers, d, heads = shape_dims(spec)
    layers, batch, length = dims
    layers = layers or full_layers
    print(f"shape {label}: d={d}, heads={heads}, layers {layers} of {full_layers}, batch {batch} x length {length}",
          flush=True)
    models = {name: build_lm(layers, d, heads, device, args.seed).eval() for name in VARIANTS}
    for name, model in models.items():
        model.requires_grad_(False)
        if name == BASE:
            continue
        cfg = LoRAConfig(rank=8, alpha=8) if name.startswith("LoRA ") else LoRTAConfig(rank=8, alpha=8)
        randomize(add_adapter(model, cfg), args.seed + 1)
        if name.endswith(" merged"):
            get_adapter_set(model).merge()
    tokens = random_tokens(models[BASE], batch, length, device, args.seed)
    last = layers

    def forward(model):
        def run():
            with torch.no_grad(), autocast(device, bf16):
                model(tokens, repr_layers=[last])
        return run

    with torch.no_grad():  # the merged model really differs from the base, and equals the unmerged one
        reps = {n: models[n](tokens, repr_layers=[last])["representations"][last].float() for n in VARIANTS[:3]}
    check = {"merged_minus_base_max_abs": float((reps[VARIANTS[1]] - reps[BASE]).abs().max()),
             "merged_minus_unmerged_max_abs": float((reps[VARIANTS[1]] - reps[VARIANTS[2]]).abs().max())}
    times = interleaved({n: forward(m) for n, m in models.items()}, conf["repeats"], conf["steps"], device,
                        warmup=conf["warmup"], seed=args.seed, best_of=conf.get("best_of", 1))
    variants = {n: {"seconds_per_forward": summary(times[n]), "wall_seconds_per_forward": summary(times[n + "@wall"]),
                    "vs_base": ratio_summary(times[n], times[BASE])} for n in VARIANTS}
    del models
    return {"shape": label, "d_model": d, "heads": heads, "layers": layers, "layers_full": full_layers,
            "batch": batch, "length": length, "bf16": bf16, "variants": variants, "check": check}


def tables(results, conf) -> list:
    rows = []
    for r in results:
        v = r["variants"]
        rows.append([r["shape"], f"{r['d_model']}×{r['heads']}h, {r['layers']}/{r['layers_full']} layers, "
                                 f"{r['batch']}×{r['length']}",
                     fmt_ms(v[BASE]["seconds_per_forward"]), fmt_ratio(v["LoRTA r=8 merged"]["vs_base"]),
                     fmt_ratio(v["LoRTA r=8 unmerged"]["vs_base"]), fmt_ratio(v["LoRA r=8 unmerged"]["vs_base"]),
                     f"{r['check']['merged_minus_base_max_abs']:.2g}",
                     f"{r['check']['merged_minus_unmerged_max_abs']:.2g}"])
    return [{"title": "Inference: forward time over the base model (median of per-round ratios, min–max)",
             "columns": ["shape", "width×heads, layers, batch×length", "base ms/forward", "LoRTA r=8 merged / base",
                         "LoRTA r=8 unmerged / base", "LoRA r=8 unmerged / base", "max abs(merged − base)",
                         "max abs(merged − unmerged)"],
             "rows": rows,
             "notes": [f"{conf['repeats']} interleaved rounds; a round's value is the best of {conf.get('best_of', 1)} "
                       f"measurement(s) of {conf['steps']} forward(s); {conf['warmup']} warm-up; no gradient, eval "
                       "mode. Target: merged / base within 1.00 ± 0.02."]}]


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_merged(d: dict) -> tuple[list, str]:
    res = d["results"]
    merged = {r["shape"]: r["variants"]["LoRTA r=8 merged"]["vs_base"] for r in res}
    worst = max(abs(s["median"] - 1) for s in merged.values())
    targets = [[f"merged / base forward time, {s} shape", "1.00 ± 0.02", fmt_ratio(q),
                "met" if abs(q["median"] - 1) <= 0.02 else "missed"] for s, q in merged.items()]
    unm = "; ".join(f"{r['shape']} LoRTA {r['variants']['LoRTA r=8 unmerged']['vs_base']['median']:.3f}, "
                    f"LoRA {r['variants']['LoRA r=8 unmerged']['vs_base']['median']:.3f}" for r in res)
    return targets, (
        "Merging folds ΔW into the weights and removes the hooks, so the merged model runs the base model's code "
        f"on weights of the same shapes: merged/base stays within {worst:.3f} of 1 (medians). The outputs confirm "
        "it is a real merge (the final representations move: max abs(merged − base) > 0) of the same function "
        "(max abs(merged − unmerged) is float rounding). Unmerged, every projection also pays the adapter's thin "
        "products and the addition of Δy, "
        f"passes over N×d activations that weigh more at small width: {unm}.")


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "merged_inference": ("2. Merged inference", read_merged),
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma-separated subset of " + ", ".join(SHAPES))
    p.add_argument("--no-bf16", action="store_true")
    args = p.parse_args()
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = run_conf(args, DEFAULTS[device.type], smoke=dict(SMOKE_RUNS, repeats=3))
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    bf16 = device.type == "cuda" and not args.no_bf16
    results = [run_shape(label, spec, dims[device.type], device, args, conf, bf16)
               for label, (spec, dims) in shapes.items()]
    finish("merged_inference", args, device, started, load_before,
           {"config": conf, "results": results, "tables": tables(results, conf)})


if __name__ == "__main__":
    main()
