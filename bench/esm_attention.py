"""Benchmark: ESM-2 attention through SDPA against fair-esm's own attention, against sequence length.

One forward + backward (loss: mean of the final representation) of a randomly initialised ESM-2
with a LoRTA r=8 adapter (base frozen, as in fine-tuning), batch 1, for two variants on ONE model:
`original` (fair-esm's `MultiheadAttention.forward`, which keeps the (heads·L)×L scores and
probabilities for backward) and `sdpa` (esmfold_peft/fold/esm_attention.py, fused
`scaled_dot_product_attention`). The variants are interleaved (bench/common.py); memory is one
step's peak. Both variants' final representations are compared, so a number here is never a
number of a different function.

Shapes keep ESM-2's true width, heads and depth (35M: 12 layers × 480, 20 heads; 650M: 33 × 1280,
20 heads). On CPU the default lengths stop where one shape's run would take more than a few
minutes on 2 busy cores; on CUDA they go to 2048 with bf16 autocast.

    python bench/esm_attention.py                          # the device's default shapes and lengths
    python bench/esm_attention.py --shapes 35M --lengths 256,512,1024,2048
    python bench/esm_attention.py --smoke                  # tiny shapes, seconds
"""

from __future__ import annotations

import time

import torch

from common import (autocast, base_parser, finish, fmt_mib, fmt_ms, fmt_ratio, interleaved, load_average,
                    peak_memory, pick_device, ratio_summary, resident_bytes, set_threads, summary)
from esmfold_peft.adapters import LoRTAConfig, add_adapter
from esmfold_peft.fold.esm_attention import disable_sdpa, enable_sdpa

# name -> ((layers, d, heads), {device kind: lengths})
SHAPES = {
    "35M": ((12, 480, 20), {"cpu": (256, 512, 1024), "cuda": (256, 512, 1024, 2048)}),
    "650M": ((33, 1280, 20), {"cpu": (256,), "cuda": (256, 512, 1024, 2048)}),
}
SMOKE_SHAPES = {"tiny": ((2, 64, 4), {"cpu": (16, 32), "cuda": (16, 32)})}
VARIANTS = ("original", "sdpa")
DEFAULTS = {"cpu": dict(repeats=3, steps=1, warmup=1), "cuda": dict(repeats=5, steps=3, warmup=2)}
RANK = 8


def build_lm(n_layers: int, d: int, heads: int, device: torch.device, seed: int):
    import esm

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
    last = model.num_layers
    switch = {"original": disable_sdpa, "sdpa": enable_sdpa}
    final = {}

    def step(name):
        def run():
            switch[name](model)
            with autocast(device, bf16):
                rep = model(inputs["tokens"], repr_layers=[last])["representations"][last]
            rep.float().mean().backward()
            final[name] = rep.detach()
            for p in model.parameters():
                p.grad = None
        return run

    return {name: step(name) for name in VARIANTS}, final


def run_length(model, length, device, args, conf, bf16) -> dict:
    inputs = {"tokens": random_tokens(model, length, device, args.seed)}
    steps, final = make_steps(model, inputs, device, bf16)
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed)
    resident = resident_bytes(model, inputs["tokens"])
    memory = {name: peak_memory(fn, device, lambda: resident) for name, fn in steps.items()}
    diff = (final["sdpa"].float() - final["original"].float()).abs().max().item()
    out = {"tokens": length, "resident_bytes": resident, "max_abs_diff_final_representation": diff, "variants": {}}
    for name in VARIANTS:
        out["variants"][name] = {"seconds_per_step": summary(times[name]),
                                 "wall_seconds_per_step": summary(times[name + "@wall"]),
                                 "peak_bytes": memory[name], "transient_bytes": memory[name] - resident}
    v = out["variants"]
    out["ratios"] = {"sdpa/original time": ratio_summary(times["sdpa"], times["original"]),
                     "sdpa/original peak memory": v["sdpa"]["peak_bytes"] / v["original"]["peak_bytes"],
                     "sdpa/original transient memory": (v["sdpa"]["transient_bytes"] / v["original"]["transient_bytes"]
                                                        if v["original"]["transient_bytes"] > 0 else None)}
    print(f"  L={length}: time sdpa/original {out['ratios']['sdpa/original time']['median']:.3f}, transient memory "
          f"{fmt_mib(v['original']['transient_bytes'])} -> {fmt_mib(v['sdpa']['transient_bytes'])} MiB, "
          f"max |diff| {diff:.2e}", flush=True)
    return out


def run_shape(label, dims, lengths, device, args, conf, bf16) -> dict:
    layers, d, heads = dims
    layers = args.layers or layers
    print(f"shape {label}: {layers} layers, d={d}, heads={heads}, LoRTA r={RANK}, batch 1, lengths "
          f"{', '.join(map(str, lengths))}", flush=True)
    model = build_lm(layers, d, heads, device, args.seed)
    per_length = {str(L): run_length(model, L, device, args, conf, bf16) for L in lengths}
    del model
    return {"shape": label, "d_model": d, "heads": heads, "layers": layers, "layers_full": dims[0], "batch": 1,
            "bf16": bf16, "lengths": per_length}


def tables(results, device, conf) -> list:
    rows = []
    for r in results:
        for length, m in r["lengths"].items():
            o, s, q = m["variants"]["original"], m["variants"]["sdpa"], m["ratios"]
            tq = q["sdpa/original transient memory"]
            rows.append([r["shape"], f"{r['layers']}/{r['layers_full']} × {r['d_model']}, {r['heads']}h", length,
                         fmt_ms(o["seconds_per_step"]), fmt_ms(s["seconds_per_step"]),
                         fmt_ratio(q["sdpa/original time"]), fmt_mib(o["peak_bytes"]), fmt_mib(s["peak_bytes"]),
                         f"{q['sdpa/original peak memory']:.3f}", fmt_mib(o["transient_bytes"]),
                         fmt_mib(s["transient_bytes"]), "–" if tq is None else f"{tq:.3f}",
                         f"{m['max_abs_diff_final_representation']:.1e}"])
    mem_kind = "max_memory_allocated" if device.type == "cuda" else "live tensor bytes (dispatch-mode tracker)"
    prec = "bf16 autocast" if results and results[0]["bf16"] else "float32"
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
                       "representations."]}]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma-separated subset of " + ", ".join(SHAPES))
    p.add_argument("--lengths", default="", help="comma-separated lengths for every shape (default: per shape)")
    p.add_argument("--layers", type=int, default=0, help="layers of every shape (0: the architecture's)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed measurement (0: the device's default)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA too")
    args = p.parse_args()
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    kind = device.type
    conf = dict(repeats=2, steps=1, warmup=1) if args.smoke else dict(DEFAULTS[kind])
    for k in ("repeats", "steps", "warmup"):
        if getattr(args, k):
            conf[k] = getattr(args, k)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    bf16 = kind == "cuda" and not args.no_bf16
    results = []
    for label, (dims, lengths) in shapes.items():
        ls = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else lengths[kind]
        results.append(run_shape(label, dims, ls, device, args, conf, bf16))
    finish("esm_attention", args, device, started, load_before,
           {"config": {**conf, "rank": RANK, "layers_override": args.layers or None}, "results": results,
            "tables": tables(results, device, conf)})


if __name__ == "__main__":
    main()
