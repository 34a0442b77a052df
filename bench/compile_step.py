"""Benchmark 10: torch.compile of the trunk's blocks and the LM's layers (model.compile), eager against compiled.

Parts (`--parts`, default fold,lm), each on one model whose blocks are switched between eager and
compiled (`esmfold_peft.fold.model.build.set_compile` / `compile_blocks`), so every variant runs the same
weights:
  fold  one paper_d4 training step as bench/fold_step.py takes it (its model and step: LoRTA r=8 on
        a random 35M-shaped ESM-2, 12 trunk blocks with c_s 1024, c_z 128 and per-block activation
        checkpointing; the package's training step, fold_step: forward, fold_loss, backward, clipping,
        the divergence rule, Adam; batch 1, 0 recycles), crop 64 on
        CPU (float32), 256 on CUDA (bf16 autocast): model.compile none, trunk and both.
  lm    an ESM-2 35M-shaped LM (12 layers, d 480, 20 heads, SDPA attention as model.lm.sdpa; random
        weights) with LoRTA r=8: forward, backward and Adam on the factors (bench/adapter_step.py's
        step, with the last representation weighted by fixed random numbers as the loss, so that its
        gradients are not rounding noise), batch 1 × 512 tokens on CPU, 8 × 512 bf16 on CUDA: eager
        and compiled layers.
  predict  one prediction (fold/predict.py's predict_sequences, paper_d4's model with its LoRTA merged,
        float32, 0 recycles), 128 residues on CPU, 512 on CUDA: model.compile none and trunk (the GPU
        suite runs this part).

Compile time: a compiled variant's first step less its median step (dynamo, AOTAutograd and
inductor, forward and backward graphs; on CPU inductor compiles in this process, compile_threads=1,
and its C++ compiler's CPU seconds are counted with the process's), with inductor's on-disk caches in
a new, empty folder; then again after `torch._dynamo.reset()`, the caches filled, as a second process
on the same machine would (a resumed run, a prediction). With an adapter, each adapted layer or
block compiles a graph of its own (its hook picks its layer's factors by a Python index, a constant
to the compiler); blocks without one share a graph.
`both` is compiled after `trunk`, so its compile time is the LM's. Outputs: the same forward +
backward eager and compiled, on the same weights, input and random seed: max |Δ| of the outputs
(fold: final atom positions, Å; lm: the last representation; predict: Cα positions) and of the
LoRTA factors' gradients, relative to their largest entry (the factors are set to seeded random
values first: B starts at zero, which would leave the others without gradient; and seeded noise is
added to the folding weights, whose zero-initialised layers make every block the identity). Then
warm-up and interleaved rounds (bench/common.py), ratios per round.

Memory: the most a step holds above what the process held when it started; CUDA:
max_memory_allocated, CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs, after
malloc_trim), since the dispatch-mode tracker of bench/common.py sees no tensor of compiled code
(dynamo runs the eager code while a dispatch mode is active).

    python bench/compile_step.py                 # fold and lm, the device's default shapes
    python bench/compile_step.py --parts lm      # one part
    python bench/compile_step.py --smoke         # tiny shapes, dynamo's eager backend: checks the script runs
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import (autocast, base_parser, cuda_transient, finish, fmt_ratio, fmt_s, interleaved, load_average,
                    pick_device, ratio_summary, set_threads, summary, synchronize, verdict_at_most)

PARTS = ("fold", "lm", "predict")
DEFAULT_PARTS = ("fold", "lm")
FOLD_MODES = ("none", "trunk", "both")
DEFAULTS = {
    "fold": {"cpu": dict(crop=64, repeats=3, steps=1, warmup=1), "cuda": dict(crop=256, repeats=3, steps=2, warmup=2)},
    "lm": {"cpu": dict(batch=1, length=512, repeats=5, steps=1, warmup=1),
           "cuda": dict(batch=8, length=512, repeats=5, steps=5, warmup=2)},
    "predict": {"cpu": dict(length=128, recycles=0, repeats=3, steps=1, warmup=1),
                "cuda": dict(length=512, recycles=0, repeats=3, steps=2, warmup=1)},
}
SMOKE = {"fold": dict(crop=16, repeats=2, steps=1, warmup=1),
         "lm": dict(batch=1, length=16, repeats=2, steps=1, warmup=1),
         "predict": dict(length=16, recycles=0, repeats=2, steps=1, warmup=1)}
LM_SHAPE = "esm2_t12_35M"
SMOKE_LM_SHAPE = (2, 64, 4)


def log(*a, **k):
    k.setdefault("flush", True)
    print(*a, **k)


# --- measuring -----------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (inductor's C++ compiler runs)."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def timed(fn, device) -> tuple:
    """(result, CPU seconds, wall seconds) of one call."""
    synchronize(device)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = fn()
    synchronize(device)
    return out, _cpu_seconds() - c0, time.perf_counter() - t0


def _status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def step_memory(fn, device) -> int:
    """Most bytes one call holds above what was held when it started (CUDA: allocated; CPU: resident set)."""
    gc.collect()
    if device.type == "cuda":
        return cuda_transient(fn, device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so the start is what is live
    except (OSError, AttributeError):
        pass
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set size
    fn()
    return _status_bytes("VmHWM") - before


def randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(((torch.rand(p.shape, generator=g) - 0.5) * 0.2).to(p.device, p.dtype))


def perturb_folding_weights(model, seed: int) -> None:
    """Seeded noise on every weight outside the LM: openfold and fair-esm zero-initialise the last layer of
    each block's updates (and the structure module's), so at initialisation a trunk block is the identity
    and eager and compiled blocks would agree trivially (and every Cα would sit at the origin)."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("esm."):
                p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))


def differences(eager, compiled) -> dict:
    """max |Δ| of the output, and of the factor gradients relative to each factor's largest gradient (None
    without gradients)."""
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    rel = max((float((grads_c[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads_e.items()),
              default=None)
    return {"max_abs_output_difference": float((out_c.float() - out_e.float()).abs().max()),
            "output_scale": float(out_e.float().abs().max()), "max_rel_factor_gradient_difference": rel}


@contextlib.contextmanager
def empty_compile_cache():
    """Compile from nothing: inductor's on-disk caches (graphs, AOTAutograd, kernels) in a new temporary folder."""
    folder, before = tempfile.mkdtemp(prefix="inductor-cache-"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def compile_and_measure(steps: dict, reference: str, forward_backward, conf: dict, device, seed: int,
                        again: bool = True) -> dict:
    """Everything measured for one part. `steps[name]()` runs one step of a variant (a compiled one compiles
    at its first step); `forward_backward(name)` returns (output, {factor: gradient}) on the weights and
    input of the moment.

    Compile time: a variant's first step less its median step, with inductor's caches empty and (`again`)
    after torch._dynamo.reset(), with them filled (what another process pays); in the benchmark's clock
    (bench/common.py: CPU seconds on CPU, here with those of finished child processes, the C++ compiler's)
    and in wall seconds. Then its differences from the reference's outputs and gradients (both computed
    back to back, on the same weights), interleaved times, memory and ratios."""
    compiled = [n for n in steps if n != reference]
    steps[reference]()  # one-time costs of the eager path
    first = {n: timed(steps[n], device)[1:] for n in compiled}
    ref = forward_backward(reference)
    diffs = {n: differences(ref, forward_backward(n)) for n in compiled}
    if again:
        torch._dynamo.reset()
    cached = {n: timed(steps[n], device)[1:] for n in compiled} if again else {}
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=seed, log=log)
    memory = {n: step_memory(fn, device) for n, fn in steps.items()}
    out = {}
    for n in steps:
        v = out[n] = {"seconds_per_step": summary(times[n]), "wall_seconds_per_step": summary(times[n + "@wall"]),
                      "vs_eager": ratio_summary(times[n], times[reference]), "step_memory_bytes": memory[n],
                      "memory_vs_eager": memory[n] / memory[reference] if memory[reference] > 0 else None}
        if n in compiled:
            step, wall = v["seconds_per_step"]["median"], v["wall_seconds_per_step"]["median"]
            v.update(compile_seconds=first[n][0] - step, compile_wall_seconds=first[n][1] - wall,
                     cached_compile_seconds=cached[n][0] - step if again else None,
                     cached_compile_wall_seconds=cached[n][1] - wall if again else None, **diffs[n])
            rel = v["max_rel_factor_gradient_difference"]
            log(f"  {n}: compile {v['compile_seconds']:.1f} s ({v['compile_wall_seconds']:.1f} s wall)"
                + (f", caches filled {v['cached_compile_seconds']:.1f} s" if again else "")
                + f"; max |Δ| output {v['max_abs_output_difference']:.1e}"
                + ("" if rel is None else f", factor gradients {rel:.1e} (relative)"))
    return out


# --- the parts ---------------------------------------------------------------------------------------

def fold_part(conf: dict, device, bf16: bool, smoke: bool, seed: int, again: bool = True) -> dict:
    """paper_d4's training step (the package's fold_step, as bench/fold_step.py runs it) with model.compile none,
    trunk and both."""
    from esmfold_peft.fold.model.build import set_compile
    from esmfold_peft.fold.model.losses import fold_loss
    from fold_step import build, fold_config, make_steps, training_batch

    cfg = fold_config(smoke)
    torch.manual_seed(seed)
    model, aset = build(cfg, device)
    model.train()
    aset.set_active("default")
    factors = dict(aset.get("default").named_parameters())
    randomise(factors.values(), seed)
    perturb_folding_weights(model, seed)
    batch, source = training_batch(conf["crop"], seed)
    batch = {k: v.to(device) for k, v in batch.items()}
    steps, _, counts, _ = make_steps(model, aset, cfg, batch, device, bf16)
    log(f"[fold] {cfg.name}{' (smoke: tiny trunk)' if smoke else ''}, crop {conf['crop']}, bf16={bf16}, "
        f"LoRTA r=8 on the LM")

    def forward_backward(mode):
        set_compile(model, mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the structure module's dropout (eager in every variant)
        with autocast(device, bf16):
            out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=0)
            loss, _ = fold_loss(out, batch, cfg.loss)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in factors.items()}
        model.zero_grad(set_to_none=True)
        return out["positions"][-1].detach(), grads

    def step_for(mode):
        def step():
            set_compile(model, mode)
            steps["lorta r=8"]()
        return step

    variants = compile_and_measure({m: step_for(m) for m in FOLD_MODES}, "none", forward_backward, conf, device, seed,
                                   again)
    set_compile(model, "none")
    return {"config": conf, "bf16": bf16, "batch_source": source, "trainable_parameters": counts["lorta r=8"],
            "model": {"config": cfg.name + (" (smoke: tiny trunk)" if smoke else ""),
                      "lm": cfg.model.lm.name + " (random init)", "trunk_blocks": cfg.model.trunk.num_blocks,
                      "c_s": cfg.model.trunk.sequence_state_dim, "c_z": cfg.model.trunk.pairwise_state_dim,
                      "checkpoint_blocks": cfg.model.checkpoint_blocks},
            "variants": variants, "order": list(FOLD_MODES)}


def lm_part(conf: dict, device, bf16: bool, smoke: bool, seed: int) -> dict:
    """An ESM-2 35M-shaped LM + LoRTA r=8 training step, its layers eager and compiled."""
    import adapter_step as A

    from esmfold_peft.adapters import LoRTAConfig, add_adapter
    from esmfold_peft.fold.model.build import compile_blocks
    from esmfold_peft.fold.model.esm_attention import enable_sdpa

    spec = SMOKE_LM_SHAPE if smoke else LM_SHAPE
    layers, d, heads = A.shape_dims(spec)
    model = A.build_lm(layers, d, heads, device, seed).train()
    enable_sdpa(model)
    adapter = add_adapter(model, LoRTAConfig(rank=8, alpha=8))
    factors = dict(adapter.named_parameters())
    randomise(factors.values(), seed)
    optimizer = torch.optim.Adam(factors.values(), lr=1e-4)
    tokens = A.random_tokens(model, conf["batch"], conf["length"], device, seed)
    last = model.num_layers
    # loss: the last representation against fixed random weights (after the final LayerNorm its mean, or
    # mean square, hardly depends on the input, which would leave gradients of rounding noise alone)
    target = torch.randn(conf["batch"], conf["length"], d, generator=torch.Generator().manual_seed(seed + 3))
    target = target.to(device)
    log(f"[lm] {layers} layers, d={d}, heads={heads}, batch {conf['batch']} x {conf['length']}, bf16={bf16}, LoRTA r=8")

    def loss_backward(variant):
        compile_blocks(model.layers, "lm", on=variant == "compiled")
        with autocast(device, bf16):
            rep = model(tokens, repr_layers=[last])["representations"][last]
        (rep.float() * target).mean().backward()
        return rep.detach()

    def forward_backward(variant):
        rep = loss_backward(variant)
        grads = {n: p.grad.detach().clone() for n, p in factors.items()}
        optimizer.zero_grad(set_to_none=True)
        return rep, grads

    def step_for(variant):
        def step():
            loss_backward(variant)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    names = ("eager", "compiled")
    variants = compile_and_measure({n: step_for(n) for n in names}, "eager", forward_backward, conf, device, seed)
    compile_blocks(model.layers, "lm", on=False)
    return {"config": conf, "bf16": bf16, "shape": "tiny" if smoke else LM_SHAPE, "layers": layers, "d_model": d,
            "heads": heads, "trainable_parameters": sum(p.numel() for p in factors.values()), "variants": variants,
            "order": list(names)}


def predict_part(conf: dict, device, smoke: bool, seed: int, again: bool = True) -> dict:
    """Prediction (fold/predict.py's predict_sequences) with paper_d4's model, trunk eager and compiled."""
    from esmfold_peft.fold.model.build import set_compile
    from esmfold_peft.fold.model.esmfold import CA
    from esmfold_peft.fold.predict import predict_sequences
    from predict_throughput import build_predictor, random_sequence

    model, cfg = build_predictor("paper_d4", smoke, device, seed)  # LoRTA r=8 merged, as predict.py runs it
    perturb_folding_weights(model, seed)
    seq = random_sequence(conf["length"], seed)
    log(f"[predict] {cfg.name}{' (smoke: tiny trunk)' if smoke else ''}, {conf['length']} residues, "
        f"{conf['recycles']} recycles")

    def predict(mode):
        set_compile(model, mode)
        with torch.no_grad():
            pred = predict_sequences(model, [seq], device, conf["recycles"])[0]
        return torch.from_numpy(pred.atom_positions[:, CA]), {}

    modes = ("none", "trunk")
    variants = compile_and_measure({m: (lambda m=m: predict(m)) for m in modes}, "none", predict, conf, device, seed,
                                   again)
    set_compile(model, "none")
    return {"config": conf, "bf16": False, "model": {"config": cfg.name + (" (smoke: tiny trunk)" if smoke else ""),
                                                     "trunk_blocks": cfg.model.trunk.num_blocks},
            "variants": variants, "order": list(modes)}


# --- tables ------------------------------------------------------------------------------------------

def _mib(b) -> str:
    return f"{b / 2 ** 20:,.1f}"


def tables(r: dict, prefix: str = "torch.compile") -> list:
    out = []
    kind = "peak resident set size above the step's start" if r["device"] == "cpu" else \
        "max_memory_allocated above the step's start"
    clock = " CPU" if r["device"] == "cpu" else ""
    compile_note = "compile: a variant's first step less its median step, inductor's caches empty" + (
        ", then again after torch._dynamo.reset() with its on-disk caches filled (as a second process)"
        if r.get("again", True) else "") + (
        ", in CPU seconds of this process and of its C++ compiler runs" if r["device"] == "cpu" else
        ", in wall seconds")
    for part, label in (("fold", "model.compile"), ("lm", "LM layers"), ("predict", "model.compile")):
        if part not in r:
            continue
        x = r[part]
        rows = []
        for n in x["order"]:
            v = x["variants"][n]
            first = "eager" if n in ("none", "eager") else None
            rows.append([n, fmt_s(v["seconds_per_step"]), "1" if first else fmt_ratio(v["vs_eager"]),
                         _mib(v["step_memory_bytes"]),
                         "1" if first or v["memory_vs_eager"] is None else f"{v['memory_vs_eager']:.3f}",
                         "–" if first else f"{v['compile_seconds']:.1f} ({v['compile_wall_seconds']:.1f})",
                         "–" if first or v["cached_compile_seconds"] is None else
                         f"{v['cached_compile_seconds']:.1f} ({v['cached_compile_wall_seconds']:.1f})",
                         "–" if first else f"{v['max_abs_output_difference']:.1e} (of {v['output_scale']:.1e})",
                         "–" if first or v["max_rel_factor_gradient_difference"] is None
                         else f"{v['max_rel_factor_gradient_difference']:.1e}"])
        prec = "bf16 autocast" if x["bf16"] else "float32"
        if part == "fold":
            m = x["model"]
            title = (f"{prefix}, folding step: {m['config']} ({m['trunk_blocks']} trunk blocks, c_s {m['c_s']}, "
                     f"c_z {m['c_z']}, checkpointed: {m['checkpoint_blocks']}; {m['lm']} + LoRTA r=8), crop "
                     f"{x['config']['crop']}, batch 1, 0 recycles, {prec}")
            what = "final atom positions (Å)"
        elif part == "predict":
            title = (f"{prefix}, prediction: {x['model']['config']} ({x['model']['trunk_blocks']} trunk blocks, "
                     f"LoRTA merged), {x['config']['length']} residues, {x['config']['recycles']} recycles, float32")
            what = "Cα positions (Å)"
        else:
            title = (f"{prefix}, ESM-2 step: {x['shape']} ({x['layers']} layers, d {x['d_model']}, {x['heads']} "
                     f"heads, SDPA) + LoRTA r=8, batch {x['config']['batch']} × {x['config']['length']}, {prec}")
            what = "last representation"
        c = x["config"]
        out.append({"title": title,
                    "columns": [label, "s/step median (min–max)", "time / eager", "step memory MiB", "memory / eager",
                                f"compile s{clock} (wall)", "again, caches filled", f"max abs Δ, {what}",
                                "max abs Δ, factor grads (relative)"],
                    "rows": rows,
                    "notes": [f"backend {r['backend']}; {c['repeats']} interleaved rounds of {c['steps']} step(s) "
                              f"after {c['warmup']} warm-up, after the compiling step; time / eager: median of "
                              f"per-round ratios (min–max); memory: {kind}, one step; {compile_note}"
                              + ("; both is compiled after trunk, so its compile time is the LM's" if part == "fold"
                                 else "") + "."]})
    return out


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_compile_step(d: dict) -> tuple[list, str]:
    targets, parts, amortise = [], [], []
    for key, label in (("fold", "folding step"), ("lm", "ESM-2 step"), ("predict", "prediction")):
        if key not in d:
            continue
        x = d[key]
        eager = x["variants"][x["order"][0]]
        cold = cached = 0.0  # the fold part compiles `both` after `trunk`: its times are the LM's alone
        for name in x["order"][1:]:
            v = x["variants"][name]
            again = v.get("cached_compile_seconds")
            cold, cached = cold + v["compile_seconds"], cached + (again or 0.0)
            q = v["vs_eager"]
            what = f"{label}, {'model.compile=' + name if key != 'lm' else 'layers compiled'}"
            targets.append([f"compiled / eager time, {what}", "< 1", fmt_ratio(q), verdict_at_most(q)])
            notes = ([] if again is None else [f"{again:.0f} s from filled caches"]) + \
                (["the LM's, after the trunk's"] if name == "both" else [])
            rel = v["max_rel_factor_gradient_difference"]
            parts.append(f"{what}: {fmt_ratio(q)} of the eager time, "
                         + ("–" if v["memory_vs_eager"] is None else f"{v['memory_vs_eager']:.2f}")
                         + f" of its step memory, compiled in {v['compile_seconds']:.0f} s"
                         + (f" ({'; '.join(notes)})" if notes else "")
                         + f"; max |Δ| output {v['max_abs_output_difference']:.1e} (largest value "
                         f"{v['output_scale']:.1e})"
                         + ("" if rel is None else f", factor gradients {rel:.1e} relative"))
            saving = eager["seconds_per_step"]["median"] - v["seconds_per_step"]["median"]
            if q["median"] < 1 and saving > 0:
                amortise.append(f"{what} after {cold / saving:,.0f} steps"
                                + ("" if again is None else f" ({cached / saving:,.0f} with the caches filled)"))
    clock = "CPU" if d["device"] == "cpu" else "wall"
    text = ("The folding step is the package's training step (`fold_step`, what every run calls). "
            "Each trunk block and each LM layer is compiled on its own; recycling, the structure module, the "
            "losses and the optimizer stay eager. Compiled against eager on the same weights and input ("
            f"backend {d['backend']}, compile times in {clock} seconds): " + "; ".join(parts) + ". ")
    text += (("The per-step saving repays the compile time: " + "; ".join(amortise) + ".") if amortise else
             "No compiled variant was faster than eager here: on this machine compiling costs its compile time "
             "and saves nothing.")
    if d["device"] == "cpu":
        text += " On GPU the GPU suite's section (e) measures the same switch."
    return targets, text


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "compile_step": ("10. torch.compile", read_compile_step),
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    p.add_argument("--crop", type=int, default=0, help="fold crop (0: 64 on CPU, 256 on CUDA, smoke 16)")
    p.add_argument("--length", type=int, default=0,
                   help="LM tokens per sequence, or residues to predict (0: 512; predict 128 on CPU; smoke 16)")
    p.add_argument("--backend", default="", help="torch.compile backend (default inductor; --smoke: eager, which "
                   "captures the graphs with dynamo and runs them as they are)")
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA too")
    args = p.parse_args()
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or any(s not in PARTS for s in parts):
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    from esmfold_peft.fold.model import build as fold_build

    fold_build.COMPILE_BACKEND = args.backend or ("eager" if args.smoke else "inductor")
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # compile in this process: its CPU seconds are counted
    bf16 = device.type == "cuda" and not args.no_bf16
    result = {"device": device.type, "backend": fold_build.COMPILE_BACKEND, "parts": parts, "again": True}
    with empty_compile_cache():
        run_parts(parts, args, device, bf16, result)
    result["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    result["tables"] = tables(result)
    finish("compile_step", args, device, started, load_before, result)


def run_parts(parts, args, device, bf16: bool, result: dict) -> None:
    for part in parts:
        conf = dict(SMOKE[part] if args.smoke else DEFAULTS[part][device.type])
        if args.repeats:
            conf["repeats"] = args.repeats
        if part == "fold":
            conf["crop"] = args.crop or conf["crop"]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
                result["fold"] = fold_part(conf, device, bf16, args.smoke, args.seed)
        elif part == "lm":
            conf["length"] = args.length or conf["length"]
            result["lm"] = lm_part(conf, device, bf16, args.smoke, args.seed)
        else:
            conf["length"] = args.length or conf["length"]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
                result["predict"] = predict_part(conf, device, args.smoke, args.seed)


if __name__ == "__main__":
    main()
