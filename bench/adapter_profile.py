"""Diagnostic: the adapters alone, without the model: where LoRA's and LoRTA's own time goes.

Runs Δy of q, k, v and o for every layer of an ESM-2-shaped layout on one random activation
x (N×d, requiring grad as inside a model), then backward: exactly the work an adapter adds to a
training step, with the base model's matmuls taken away (they dominate the full step and hide the
adapters). Variants are interleaved and repeated (bench/common.py); `--profile` adds the
torch.profiler table of each variant (self time by op and input shapes), which is how the slow
(d×N)(N×r) gradient products of the first LoRTA implementation were found.
`--extra-lorta FILE` adds a second LoRTA class loaded from a file (e.g. an older lorta.py from
git) as the variant "LoRTA r=R (FILE)", to compare two implementations side by side.

    python bench/adapter_profile.py --shape 3B --tokens 128 --profile
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import torch

from adapter_step import SHAPES, shape_dims
from common import (base_parser, finish, fmt_ms, fmt_ratio, interleaved, load_average, pick_device, ratio_summary,
                    set_threads, summary, verdict_at_most)
from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, build_adapter
from esmfold_peft.adapters.layouts import AttentionLayout


def load_lorta_class(path: str):
    spec = importlib.util.spec_from_file_location("esmfold_peft.adapters._lorta_extra", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoRTA


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_adapter_profile(d: dict) -> tuple[list, str]:
    ratios = d.get("ratios", {})
    txt = "; ".join(f"{k} {fmt_ratio(q)}" for k, q in ratios.items())
    targets = [[f"LoRTA/LoRA, the adapters alone, {k}, {d['layout']['d_model']}-wide", "≤ 1", fmt_ratio(q), verdict_at_most(q)]
               for k, q in ratios.items()]
    return targets, (
        "With the frozen model taken away this is the adapters' own work, which the full step hides (there it is a "
        f"few percent of the step, less than the round-to-round noise). LoRTA/LoRA: {txt}. Per layer LoRTA runs 18 "
        "thin products (6 forward, 12 backward; x A is shared by q, k and v) against LoRA's 24, but thin products "
        "are bound by memory traffic over the N×d activations and by the BLAS kernel each operand layout selects, "
        "not by their FLOPs; at small width and rank the few tiny ops that form LoRTA's per-call factors (w, Kᵀ, "
        "Aᵀ) also show. Profiling this benchmark (`--profile`; per-op self times are in the JSON) on the first "
        "LoRTA implementation showed autograd computing its factor gradients as (d×N)(N×r) products, several "
        "times slower per call on this CPU than the (r×N)(N×d) orientation; `lorta.py` now forms Aᵀ and Kᵀ as "
        "contiguous r×d matrices, so every factor gradient takes the fast orientation.")


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "adapter_profile": ("1b. The adapters alone", read_adapter_profile),
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="3B", help=", ".join(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="N = batch × length")
    p.add_argument("--ranks", default="1,8")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--extra-lorta", default="", help="a lorta.py to compare with the installed one")
    args = p.parse_args()
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    if args.smoke:
        n_layers, d, heads, tokens, ranks, repeats = 2, 64, 4, 16, (1, 8), 2
    else:
        _, d, heads = shape_dims(SHAPES[args.shape][0])
        n_layers, tokens, ranks, repeats = args.layers, args.tokens, tuple(int(r) for r in args.ranks.split(",")), \
            args.repeats or 15
    layout = AttentionLayout("fair-esm", n_layers, d, heads, d // heads)
    adapters = {}
    for r in ranks:
        adapters[f"LoRA r={r}"] = build_adapter(LoRAConfig(rank=r, alpha=r), layout, device=device)
        adapters[f"LoRTA r={r}"] = build_adapter(LoRTAConfig(rank=r, alpha=r), layout, device=device)
        if args.extra_lorta:
            cls = load_lorta_class(args.extra_lorta)
            adapters[f"LoRTA r={r} ({Path(args.extra_lorta).name})"] = cls(LoRTAConfig(rank=r, alpha=r), layout,
                                                                          device=device)
    g = torch.Generator().manual_seed(args.seed)
    for a in adapters.values():
        for q in a.parameters():
            with torch.no_grad():
                q.copy_(torch.randn(q.shape, generator=g).to(device))
    x = torch.randn(tokens, d, generator=g).to(device).requires_grad_(True)

    def run(adapter):
        def go():
            total = 0
            for layer in range(n_layers):
                for m in "qkvo":
                    total = total + adapter.delta(x, layer, m).sum()
            total.backward()
            x.grad = None
            for q in adapter.parameters():
                q.grad = None
        return go

    runs = {name: run(a) for name, a in adapters.items()}
    times = interleaved(runs, repeats, 1 if args.smoke else 2, device, warmup=1, seed=args.seed,
                        best_of=1 if args.smoke else 3)
    profiles = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in runs.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:8]
            profiles[name] = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 3),
                               "input_shapes": str(e.input_shapes)} for e in rows]
            print(f"\n{name}: top ops by self CPU time")
            for row in profiles[name]:
                print(f"  {row['op']:28s} {row['calls']:4d} calls {row['self_ms']:8.2f} ms  {row['input_shapes']}")
    rows = [[name, fmt_ms(summary(times[name])),
             fmt_ratio(ratio_summary(times[name], times[f"LoRA r={name.split('r=')[1].split()[0]}"]))]
            for name in runs]
    table = {"title": f"Adapters alone: Δy of q,k,v,o × {n_layers} layers, forward + backward, d={d}, "
                      f"{heads} heads, N={tokens}",
             "columns": ["variant", "ms median (min–max)", "/ LoRA at equal rank"], "rows": rows,
             "notes": [f"{repeats} interleaved rounds; each round's value is the best of 3 measurements of 2 calls."]}
    ratios = {f"r={r}": ratio_summary(times[f"LoRTA r={r}"], times[f"LoRA r={r}"]) for r in ranks}
    finish("adapter_profile", args, device, started, load_before,
           {"layout": dataclasses.asdict(layout), "tokens": tokens, "times": {n: summary(times[n]) for n in runs},
            "ratios": ratios, "profiles": profiles, "tables": [table]})


if __name__ == "__main__":
    main()
