"""GPU suite: the project's real-scale measurements in one command (≤ 8 min on one H100/H200).

Sections (`--sections`, default all):
  fold     paper_d4 training steps at crop 256, bf16 autocast, LM frozen / LoRTA r=8 / LoRA r=1 / full
           (bench/fold_step.py's model and step): s/step, peak CUDA memory (`max_memory_allocated`,
           the whole process, and the variant's own share as bench/common.py counts it) and model FLOP
           utilisation: FLOPs of one step counted by `torch.utils.flop_counter.FlopCounterMode` with
           the trunk's activation checkpointing off for the count (so recomputation is not counted),
           divided by the measured s/step and the GPU's dense bf16 peak (PEAK_BF16_FLOPS).
  lm       ESM-2 adapter steps at the 650M and 3B shapes with all their layers (random weights, built
           on the GPU), batch 8 / 4 × 512 tokens, bf16 autocast: the variants of bench/adapter_step.py.
  predict  prediction throughput against fair-esm's own `ESMFold.infer` on the same weights at 256,
           512 and 1,024 residues: fair-esm's ESMFold is built with its ESM-2 loader patched to a
           random ESM-2 of the chosen shape (`--predict-shape`: esmfold_v1 = 48 blocks + ESM-2 3B, as
           esm-fold; paper_d4 = 12 blocks + 35M), and its state dict (LM included) is loaded into ours.
           fair-esm runs its LM in float16 (it halves it); ours runs it in float32 and, as a third
           variant, stored in bf16 (`model.lm.storage_dtype`), and as a fourth, float32 with its layers kept
           in host memory (`predict.py --cpu-offload`; its peak counts only what is on the GPU). Trunks
           in float32, 0 recycles. A length
           that runs out of memory unchunked is run again with every model's trunk chunked by 64.
  ddp      2-process DistributedDataParallel training of paper_d4 + LoRTA r=8 (NCCL) when
           `torch.cuda.device_count() >= 2`: s/step per process against the single-GPU step, and a
           check that both processes hold the same parameters afterwards.
  compile  whether torch.compile (model.compile) pays: the paper_d4 + LoRTA r=8 training step at crop
           256 in bf16 with model.compile none / trunk / both, and a 512-residue prediction with the
           trunk eager / compiled (bench/compile_step.py's fold and predict parts, inductor): s/step,
           compiled/eager ratio, compile time, memory, max |Δ| against eager. Compile time counts in
           the suite's wall time.

`--device cpu --smoke` runs every section on tiny shapes in seconds, through the same code (ddp
with gloo instead of NCCL on CPU; the FLOP count runs, the utilisation is left empty because a CPU
has no entry in the peak table; compile with dynamo's eager backend, which captures the graphs
without generating code). Prints its tables last and writes JSON like the CPU benchmarks
(bench/results/<machine>/gpu_suite.json).

    python bench/gpu_suite.py --device cuda
    python bench/gpu_suite.py --device cuda --sections fold,predict --predict-shape paper_d4
    python bench/gpu_suite.py --device cpu --smoke
"""

from __future__ import annotations

import copy
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import (ROOT, base_parser, finish, fmt_mib, fmt_ms, fmt_ratio, fmt_s, interleaved, load_average,
                    peak_memory, pick_device, ratio_summary, resident_bytes, set_threads, summary, synchronize,
                    verdict_at_most)
from esmfold_peft.adapters import is_adapter_param

SECTIONS = ("fold", "lm", "predict", "ddp", "compile")
# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s; matched on the device
# name in this order (the first key found in the lower-cased name wins)
PEAK_BF16_FLOPS = (
    ("h200 nvl", 835e12), ("h200", 989.4e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989.4e12),
    ("a100", 312e12),
)
LM_SHAPES = {"650M": ("esm2_t33_650M", 8, 512), "3B": ("esm2_t36_3B", 4, 512)}  # architecture, batch, length
SMOKE_LM_SHAPES = {"tiny": ((2, 64, 4), 1, 16)}
PREDICT_SHAPES = {  # trunk blocks, LM architecture
    "esmfold_v1": (48, "esm2_t36_3B_UR50D"),
    "paper_d4": (12, "esm2_t12_35M_UR50D"),
}
PREDICT_VARIANTS = ("fair-esm infer", "ours", "ours, bf16 LM", "ours, LM offloaded")
SMOKE_PREDICT_LENGTHS = (16, 24)


def log(*a, **k):
    k.setdefault("flush", True)
    print(*a, **k)


# --smoke on CPU never runs out of memory; to run the out-of-memory fallbacks too, it simulates one
# where a tag listed here is reached (recorded in the JSON as `simulated_out_of_memory`)
SIMULATED_OOM: set = set()


def maybe_simulate_oom(tag: str) -> None:
    if tag in SIMULATED_OOM:
        SIMULATED_OOM.discard(tag)
        raise torch.OutOfMemoryError(f"simulated out of memory ({tag}, --smoke)")


def peak_flops(device: torch.device):
    """(device name, dense bf16 peak FLOP/s or None) for the utilisation; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name.lower():
            return name, value
    return name, None


def is_oom(exc: BaseException) -> bool:
    from esmfold_peft.fold.predict import is_out_of_memory

    return is_out_of_memory(exc)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_memory(fn, device: torch.device, resident):
    """(the variant's own peak as bench/common.py's peak_memory counts it, max_memory_allocated or None)
    from one call of `fn`."""
    if device.type != "cuda":
        return peak_memory(fn, device, resident), None
    free_memory(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    whole = int(torch.cuda.max_memory_allocated(device))
    return int(resident() + whole - before), whole


# --- (a) folding training steps -----------------------------------------------------------------------

def count_step_flops(model, fn, device):
    """FLOPs of one call of `fn` with the trunk blocks' activation checkpointing off (model FLOPs).

    Returns (flops, includes_recomputation). If the step does not fit without checkpointing, it is
    counted with it (recomputed forwards included) and says so."""
    from torch.utils.flop_counter import FlopCounterMode

    from esm.esmfold.v1.tri_self_attn_block import TriangularSelfAttentionBlock
    from esmfold_peft.fold.model.esmfold import _CheckpointedBlock

    blocks = [b for b in model.trunk.blocks if isinstance(b, _CheckpointedBlock)]
    for attempt_plain in ((True, False) if blocks else (False,)):
        for b in blocks:
            b.__class__ = TriangularSelfAttentionBlock if attempt_plain else _CheckpointedBlock
        try:
            with FlopCounterMode(display=False) as counter:
                if attempt_plain:
                    maybe_simulate_oom("flops")
                fn()
            synchronize(device)
            return int(counter.get_total_flops()), bool(blocks) and not attempt_plain
        except Exception as exc:
            if not (is_oom(exc) and attempt_plain):
                raise
            for p in model.parameters():
                p.grad = None
            free_memory(device)
            log("  FLOP count without checkpointing ran out of memory; counting with it (recomputation included)")
        finally:
            for b in blocks:
                b.__class__ = _CheckpointedBlock
    raise AssertionError("unreachable")


def section_fold(args, device, smoke: bool) -> dict:
    from fold_step import FROZEN, VARIANTS, build, fold_config, make_steps, training_batch

    conf = dict(crop=16, repeats=2, steps=1, warmup=1) if smoke else dict(crop=256, repeats=3, steps=2, warmup=2)
    if args.crop:
        conf["crop"] = args.crop
    if args.repeats:
        conf["repeats"] = args.repeats
    bf16 = device.type == "cuda" and not args.no_bf16
    cfg = fold_config(smoke)
    torch.manual_seed(args.seed)
    model, aset = build(cfg, device)
    model.train()
    batch, source = training_batch(conf["crop"], args.seed)
    batch = {k: v.to(device) for k, v in batch.items()}
    steps, resident, counts, parts = make_steps(model, aset, cfg, batch, device, bf16)
    log(f"[fold] {cfg.name}{' (smoke: tiny trunk)' if smoke else ''}, crop {conf['crop']}, bf16={bf16}")
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed, log=log)
    gpu, peak = peak_flops(device)
    variants = {}
    for v, fn in steps.items():
        own, whole = step_memory(fn, device, resident[v])
        flops, with_recompute = count_step_flops(model, fn, device)
        s = summary(times[v])
        achieved = flops / s["median"]
        variants[v] = {"trainable_parameters": counts[v], "seconds_per_step": s,
                       "wall_seconds_per_step": summary(times[v + "@wall"]),
                       "vs_frozen": ratio_summary(times[v], times[FROZEN]), "peak_bytes": own,
                       "max_memory_allocated": whole, "flops_per_step": flops,
                       "flops_include_recomputation": with_recompute, "achieved_flops_per_s": achieved,
                       "mfu": achieved / peak if peak else None}
        log(f"  {v}: {s['median']:.3f} s/step, {flops / 1e12:.2f} TFLOP/step, {achieved / 1e12:.1f} TFLOP/s"
            + (f", MFU {achieved / peak:.1%}" if peak else ""))
    out = {"config": conf, "bf16": bf16, "batch_source": source, "gpu": gpu, "peak_bf16_flops": peak,
           "model": {"config": cfg.name + (" (smoke: tiny trunk)" if smoke else ""),
                     "lm": cfg.model.lm.name + " (random init)", "trunk_blocks": cfg.model.trunk.num_blocks,
                     "c_s": cfg.model.trunk.sequence_state_dim, "c_z": cfg.model.trunk.pairwise_state_dim},
           "parameters": parts, "variants": variants, "order": list(VARIANTS)}
    del model, aset, steps
    free_memory(device)
    return out


# --- (b) LM adapter steps at 650M and 3B ---------------------------------------------------------------

def build_esm2_on(device, layers, d, heads, seed):
    """A random fair-esm ESM-2, its parameters created directly on `device` (a 3B model in seconds)."""
    import esm

    torch.manual_seed(seed)
    with torch.device(device):
        return esm.model.esm2.ESM2(num_layers=layers, embed_dim=d, attention_heads=heads)


def section_lm(args, device, smoke: bool) -> dict:
    import adapter_step as A

    conf = dict(repeats=2, steps=1, warmup=1) if smoke else dict(repeats=3, steps=2, warmup=1)
    if args.repeats:
        conf["repeats"] = args.repeats
    bf16 = device.type == "cuda" and not args.no_bf16
    shapes = SMOKE_LM_SHAPES if smoke else LM_SHAPES
    results = []
    for label, (spec, batch, length) in shapes.items():
        layers, d, heads = A.shape_dims(spec)
        log(f"[lm] {label}: {layers} layers, d={d}, heads={heads}, batch {batch} x {length}, bf16={bf16}")
        model = build_esm2_on(device, layers, d, heads, args.seed).train()
        inputs = {"tokens": A.random_tokens(model, batch, length, device, args.seed)}
        steps, resident, params = A.make_steps(model, inputs, device, bf16)
        times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed,
                            log=log)
        memory = {n: peak_memory(fn, device, resident[n]) for n, fn in steps.items()}
        variants = {n: {"trainable_parameters": params[n], "seconds_per_step": summary(times[n]),
                        "vs_floor": ratio_summary(times[n], times[A.FLOOR]), "peak_bytes": memory[n],
                        "above_floor_bytes": memory[n] - memory[A.FLOOR]} for n in steps}
        ratios = {"LoRTA/LoRA r=1 time": ratio_summary(times["LoRTA r=1"], times["LoRA r=1"]),
                  "LoRTA/LoRA r=8 time": ratio_summary(times["LoRTA r=8"], times["LoRA r=8"]),
                  "dense/efficient r=8 time": ratio_summary(times["LoRTA r=8 dense"], times["LoRTA r=8"])}
        above = {n: v["above_floor_bytes"] for n, v in variants.items()}
        ratios["dense/efficient r=8 memory above floor"] = (above["LoRTA r=8 dense"] / above["LoRTA r=8"]
                                                            if above["LoRTA r=8"] > 0 else None)
        results.append({"shape": label, "architecture": spec if isinstance(spec, str) else "tiny", "layers": layers,
                        "d_model": d, "heads": heads, "batch": batch, "length": length, "bf16": bf16,
                        "variants": variants, "ratios": ratios})
        del model, steps, inputs
        free_memory(device)
    return {"config": conf, "results": results}


# --- (c) prediction against fair-esm's ESMFold.infer ---------------------------------------------------

def predict_shape(args, smoke: bool):
    """(trunk config dict, LM (layers, d, heads), label)."""
    from esmfold_peft.adapters import architecture
    from esmfold_peft.fold.run.config import structure_module_config, trunk_config

    if smoke:
        trunk = trunk_config(num_blocks=1, c_s=32, c_z=16, seq_head_width=16, pair_head_width=8,
                             structure_module=structure_module_config(c_s=32, c_z=16, no_blocks=2, no_heads_ipa=2,
                                                                      c_ipa=8, c_resnet=16))
        return trunk, (2, 64, 4), "tiny (1 block, c_s 32, c_z 16; ESM-2 2 x 64)"
    blocks, lm_name = PREDICT_SHAPES[args.predict_shape]
    trunk = trunk_config(num_blocks=blocks, c_s=1024, c_z=128, structure_module=structure_module_config(c_s=384, c_z=128))
    a = architecture(lm_name)
    return trunk, (a.n_layers, a.d_model, a.n_heads), f"{args.predict_shape} ({blocks} blocks, c_s 1024, c_z 128; {lm_name} shape)"


def build_fair_esmfold(trunk: dict, lm_dims, device, seed: int):
    """fair-esm's ESMFold with its ESM-2 loader patched to a random ESM-2 of `lm_dims`, built on `device`."""
    import esm
    from omegaconf import OmegaConf

    from esmfold_peft import compat  # noqa: F401  (fair-esm's dataclasses on Python >= 3.11)
    from esm.esmfold.v1 import esmfold as fair_esmfold

    layers, d, heads = lm_dims

    def random_lm(*_args, **_kwargs):
        lm = build_esm2_on(device, layers, d, heads, seed)
        return lm, lm.alphabet

    patched = [(esm.pretrained, "esm2_t36_3B_UR50D", esm.pretrained.esm2_t36_3B_UR50D)]
    esm.pretrained.esm2_t36_3B_UR50D = random_lm
    registry = getattr(fair_esmfold, "esm_registry", None)  # newer fair-esm: the LM by esm_type
    saved_registry = dict(registry) if registry is not None else None
    if registry is not None:
        for key in list(registry):
            registry[key] = random_lm
    try:
        cfg = OmegaConf.create({"trunk": trunk, "lddt_head_hid_dim": 128, "esm_type": "esm2_3B"})
        torch.manual_seed(seed + 1)
        with torch.device(device):
            model = fair_esmfold.ESMFold(esmfold_config=cfg)
    finally:
        for obj, name, value in patched:
            setattr(obj, name, value)
        if registry is not None:
            registry.clear()
            registry.update(saved_registry)
    with torch.no_grad():  # openfold zero-initialises its last layers: make every tensor matter
        g = torch.Generator(device=device).manual_seed(seed + 2)
        for name, p in model.named_parameters():
            if not name.startswith("esm."):
                p.add_(0.02 * torch.randn(p.shape, generator=g, device=device, dtype=p.dtype))
    if device.type == "cpu":
        model.esm.float()  # as `esm-fold --cpu-only`: CPU float16 is slow and not what anyone runs
    return model.eval()


def build_ours_from(fair, trunk: dict, device, storage: str):
    """Our AdaptedESMFold holding fair-esm's weights: LM copied (float32 unless stored in bf16), trunk and heads loaded."""
    from esmfold_peft.fold.model.esm_attention import enable_sdpa
    from esmfold_peft.fold.model.lm import set_storage_dtype
    from esmfold_peft.fold.model.esmfold import AdaptedESMFold
    from esmfold_peft.fold.run.esmfold_read import load_esmfold_state

    lm = copy.deepcopy(fair.esm).float()
    enable_sdpa(lm)  # the project's default (model.lm.sdpa)
    lm.requires_grad_(False)
    with torch.device(device):
        model = AdaptedESMFold(lm, fair.esm_dict, trunk, lddt_head_hid_dim=128)
    load_esmfold_state(model, {k: v for k, v in fair.state_dict().items() if not k.startswith("esm.")},
                       "fair-esm ESMFold (in memory)")
    set_storage_dtype(model.esm, storage)
    model.requires_grad_(False)
    return model.to(device).eval()


def on_device_bytes(model, device) -> int:
    """The model's bytes on `device` (an offloaded language model's layers are in host memory)."""
    return resident_bytes([t for t in list(model.parameters()) + list(model.buffers()) if t.device.type == device.type])


def section_predict(args, device, smoke: bool) -> dict:
    from openfold.utils.feats import atom14_to_atom37

    from esmfold_peft.fold.model.esmfold import CA
    from esmfold_peft.fold.model.offload import offload_language_model
    from esmfold_peft.fold.predict import predict_sequences
    from predict_throughput import random_sequence

    conf = dict(lengths=SMOKE_PREDICT_LENGTHS, repeats=2, steps=1, warmup=1, chunk_fallback=4) if smoke else \
        dict(lengths=(256, 512, 1024), repeats=3, steps=1, warmup=1, chunk_fallback=64)
    if args.predict_lengths:
        conf["lengths"] = tuple(int(x) for x in args.predict_lengths.split(","))
    if args.repeats:
        conf["repeats"] = args.repeats
    recycles = args.recycles
    trunk, lm_dims, label = predict_shape(args, smoke)
    log(f"[predict] {label}, lengths {conf['lengths']}, {recycles} recycles")
    fair = build_fair_esmfold(trunk, lm_dims, device, args.seed)
    models = {"fair-esm infer": fair, "ours": build_ours_from(fair, trunk, device, "float32"),
              "ours, bf16 LM": build_ours_from(fair, trunk, device, "bfloat16"),
              "ours, LM offloaded": build_ours_from(fair, trunk, device, "float32")}
    offloaded = offload_language_model(models["ours, LM offloaded"], device)  # predict.py --cpu-offload
    free_memory(device)
    lm_bytes = {n: sum(p.numel() * p.element_size() for k, p in m.esm.named_parameters() if not is_adapter_param(k))
                for n, m in models.items()}
    ca = {}

    def fair_run(seq):
        def run():
            with torch.no_grad():
                out = fair.infer(seq, num_recycles=recycles)
                atoms = atom14_to_atom37(out["positions"][-1], out)
                ca["fair-esm infer"] = atoms[0, :, CA].float().cpu()
                out["plddt"].float().cpu(), out["ptm"].float().cpu()
        return run

    def ours_run(name, seq):
        def run():
            pred = predict_sequences(models[name], [seq], device, recycles)[0]
            ca[name] = torch.from_numpy(pred.atom_positions[:, CA])
        return run

    per_length = {}
    for length in conf["lengths"]:
        seq = random_sequence(length, args.seed)
        runs = {"fair-esm infer": fair_run(seq), "ours": ours_run("ours", seq),
                "ours, bf16 LM": ours_run("ours, bf16 LM", seq),
                "ours, LM offloaded": ours_run("ours, LM offloaded", seq)}
        chunk = None
        for attempt in (None, conf["chunk_fallback"]):
            chunk = attempt
            for m in models.values():
                m.trunk.set_chunk_size(chunk)
            try:
                if attempt is None:
                    maybe_simulate_oom(f"predict {length}")
                times = interleaved(runs, conf["repeats"], conf["steps"], device, warmup=conf["warmup"],
                                    seed=args.seed, log=log)
                memory = {n: step_memory(fn, device, lambda m=models[n]: on_device_bytes(m, device))
                          for n, fn in runs.items()}
                break
            except Exception as exc:
                if not is_oom(exc) or attempt is not None:
                    raise
                free_memory(device)
                log(f"  L={length}: out of memory unchunked; again with the trunk chunked by {conf['chunk_fallback']}")
        ref = ca["fair-esm infer"]
        per_length[str(length)] = {
            "chunk_size": chunk,
            "variants": {n: {"seconds_per_prediction": summary(times[n]),
                             "residues_per_second": summary([length / t for t in times[n]]),
                             "vs_fair_esm": ratio_summary(times[n], times["fair-esm infer"]),
                             "peak_bytes": memory[n][0], "max_memory_allocated": memory[n][1],
                             "max_abs_ca_deviation_from_fair_esm": float((ca[n] - ref).abs().max())}
                         for n in runs}}
        v = per_length[str(length)]["variants"]
        log(f"  L={length}: " + ", ".join(f"{n} {v[n]['seconds_per_prediction']['median']:.3f} s" for n in runs)
            + f"; max |ΔCα| ours {v['ours']['max_abs_ca_deviation_from_fair_esm']:.3f} Å")
    for m in models.values():
        m.trunk.set_chunk_size(None)
    offloaded.remove()
    models.clear()  # free the three models before the next section
    fair = None
    free_memory(device)
    return {"config": {**conf, "lengths": list(conf["lengths"]), "recycles": recycles}, "shape": label,
            "lm_parameter_bytes": lm_bytes, "lengths": per_length}


# --- (d) 2-process DDP ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(spec: dict) -> None:
    """One DDP process (RANK, WORLD_SIZE, MASTER_* in the environment): paper_d4 + LoRTA r=8 steps."""
    import torch.distributed as dist

    from esmfold_peft.fold.model.build import build_model
    from esmfold_peft.fold.train import fold_step, seed_everything
    from esmfold_peft.runtime.session import setup_distributed, teardown_distributed

    from fold_step import fold_config, training_batch

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    d, device = setup_distributed(spec["device"])
    finished = False
    try:
        cfg = fold_config(spec["smoke"])
        seed_everything(spec["seed"])  # the same initial model in every process
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
            model = build_model(cfg).to(device)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        batch, _ = training_batch(spec["crop"], spec["seed"] + d.rank)  # each process its own example
        batch = {k: v.to(device) for k, v in batch.items()}

        def step():  # the package's training step, as a torchrun training job runs it
            fold_step(ddp, [batch], optimizer, params, cfg, recycles=0, device=device, bf16=spec["bf16"], d=d)
            optimizer.zero_grad(set_to_none=True)

        for _ in range(spec["warmup"]):
            step()
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        synchronize(device)
        dist.barrier()
        seconds = (time.perf_counter() - t0) / spec["steps"]
        flat = torch.cat([p.detach().float().flatten() for p in params])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        spread = float((hi - lo).abs().max())
        t = torch.tensor([seconds], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if d.rank == 0:
            Path(spec["result_file"]).write_text(json.dumps({
                "backend": dist.get_backend(), "world_size": d.world, "seconds_per_step": float(t.item()),
                "max_parameter_spread_across_processes": spread, "trainable_parameters": int(flat.numel())}))
        finished = True
    finally:
        teardown_distributed(synchronize=finished)


def section_ddp(args, device, smoke: bool, single_step: dict | None) -> dict:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU visible: a DDP run needs 2"}
    conf = dict(crop=16, steps=2, warmup=1) if smoke else dict(crop=256, steps=4, warmup=2)
    if args.crop:
        conf["crop"] = args.crop
    bf16 = device.type == "cuda" and not args.no_bf16
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(conf, smoke=smoke, seed=args.seed, device=device.type, bf16=bf16,
                    threads=torch.get_num_threads(), result_file=str(Path(tmp) / "ddp.json"))
        port = _free_port()
        procs = []
        log(f"[ddp] 2 processes, {'NCCL' if device.type == 'cuda' else 'gloo'}, crop {conf['crop']}, "
            f"{conf['steps']} steps after {conf['warmup']}")
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
            dev = f"cuda:{rank}" if device.type == "cuda" else "cpu"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", json.dumps(dict(spec, device=dev))]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=900)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outputs.append(p.communicate()[0])
        codes = [p.returncode for p in procs]
        result_file = Path(spec["result_file"])
        if any(codes) or not result_file.is_file():
            raise RuntimeError(f"DDP run failed (exit codes {codes}):\n" + "\n".join(o[-3000:] for o in outputs))
        result = json.loads(result_file.read_text())
    result.update(config=conf, bf16=bf16)
    if single_step:
        result["single_process_seconds_per_step"] = single_step["median"]
        result["scaling_efficiency"] = single_step["median"] / result["seconds_per_step"]
    log(f"  {result['seconds_per_step']:.3f} s/step per process, parameter spread "
        f"{result['max_parameter_spread_across_processes']:.1e}")
    return result


# --- (e) torch.compile -----------------------------------------------------------------------------------

def section_compile(args, device, smoke: bool) -> dict:
    import compile_step as C
    from esmfold_peft.fold.model import build as fold_build

    backend = fold_build.COMPILE_BACKEND = "eager" if smoke else "inductor"
    bf16 = device.type == "cuda" and not args.no_bf16
    kind = "cpu" if smoke else device.type
    fold_conf = dict(C.SMOKE["fold"]) if smoke else dict(C.DEFAULTS["fold"][kind], crop=args.crop or 256)
    predict_conf = dict(C.SMOKE["predict"]) if smoke else dict(C.DEFAULTS["predict"][kind])
    predict_conf["recycles"] = args.recycles
    if args.repeats:
        fold_conf["repeats"] = predict_conf["repeats"] = args.repeats
    log(f"[compile] backend {backend}")
    with warnings.catch_warnings(), C.empty_compile_cache():
        warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
        # compiled once, caches empty (a second compile from filled caches would cost the suite's time budget)
        fold = C.fold_part(fold_conf, device, bf16, smoke, args.seed, again=False)
        free_memory(device)
        predict = C.predict_part(predict_conf, device, smoke, args.seed, again=False)
    free_memory(device)
    return {"device": device.type, "backend": backend, "again": False, "fold": fold, "predict": predict}


# --- tables ---------------------------------------------------------------------------------------------------

def _gib(b) -> str:
    return "–" if b is None else f"{b / 2 ** 30:.2f}"


def _flops(x: float) -> str:
    """FLOPs (or FLOP/s) with a unit that keeps three significant digits."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def tables(r) -> list:
    out = []
    if "fold" in r:
        f = r["fold"]
        m = f["model"]
        rows = []
        for v in f["order"]:
            x = f["variants"][v]
            rows.append([v, f"{x['trainable_parameters']:,}", fmt_s(x["seconds_per_step"]),
                         "1" if v == "none" else fmt_ratio(x["vs_frozen"]), _gib(x["max_memory_allocated"]),
                         _gib(x["peak_bytes"]), _flops(x["flops_per_step"]) + "FLOP"
                         + (" (incl. recompute)" if x["flops_include_recomputation"] else ""),
                         _flops(x["achieved_flops_per_s"]) + "FLOP/s", "–" if x["mfu"] is None else f"{x['mfu']:.1%}"])
        prec = "bf16 autocast" if f["bf16"] else "float32"
        peak = f"{f['peak_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16 ({f['gpu']})" if f["peak_bf16_flops"] else \
            f"no peak known for {f['gpu']}"
        out.append({"title": f"GPU suite (a): training step, {m['config']} ({m['trunk_blocks']} trunk blocks, c_s {m['c_s']}, "
                             f"c_z {m['c_z']}, {m['lm']}), crop {f['config']['crop']}, batch 1, 0 recycles, {prec}",
                    "columns": ["LM", "trainable params", "s/step median (min–max)", "time / frozen",
                                "max_memory_allocated GiB", "variant's own peak GiB", "FLOPs/step",
                                "achieved", "MFU"],
                    "rows": rows,
                    "notes": [f"{f['config']['repeats']} interleaved rounds of {f['config']['steps']} step(s) after "
                              f"{f['config']['warmup']} warm-up; FLOPs: FlopCounterMode over one step with the "
                              f"trunk's activation checkpointing off (model FLOPs); MFU against {peak}. "
                              "max_memory_allocated covers the whole process (one model holds all four variants' "
                              "adapters and optimizer state); own peak counts only the variant's (bench/common.py)."]})
    if "lm" in r:
        rows = []
        for x in r["lm"]["results"]:
            for n, v in x["variants"].items():
                rows.append([x["shape"], f"{x['layers']}×{x['d_model']}, {x['heads']}h, {x['batch']}×{x['length']}",
                             n, f"{v['trainable_parameters']:,}", fmt_ms(v["seconds_per_step"]),
                             "1" if n == "floor" else f"{v['vs_floor']['median']:.2f}", fmt_mib(v["peak_bytes"]),
                             "–" if n == "floor" else fmt_mib(v["above_floor_bytes"])])
        rows2 = []
        for x in r["lm"]["results"]:
            q = x["ratios"]
            dm = q["dense/efficient r=8 memory above floor"]
            rows2.append([x["shape"], fmt_ratio(q["LoRTA/LoRA r=1 time"]), fmt_ratio(q["LoRTA/LoRA r=8 time"]),
                          fmt_ratio(q["dense/efficient r=8 time"]), "–" if dm is None else f"{dm:.2f}"])
        c = r["lm"]["config"]
        out.append({"title": "GPU suite (b): ESM-2 adapter step, all layers (forward + backward + Adam on the adapter; "
                             "floor: forward only)",
                    "columns": ["shape", "layers×width, heads, batch×length", "variant", "trainable params",
                                "ms/step median (min–max)", "× floor", "peak MiB", "above floor MiB"],
                    "rows": rows,
                    "notes": [f"{c['repeats']} interleaved rounds of {c['steps']} step(s) after {c['warmup']} "
                              "warm-up; random weights; bench/adapter_step.py's variants and step."]})
        out.append({"title": "GPU suite (b): adapter ratios (median of per-round ratios, min–max)",
                    "columns": ["shape", "LoRTA/LoRA time r=1", "LoRTA/LoRA time r=8", "dense/efficient time r=8",
                                "dense/efficient memory above floor r=8"],
                    "rows": rows2,
                    "notes": ["Targets (BENCHMARKS.md): LoRTA/LoRA time ≤ 1 at equal rank on 650M and 3B; "
                              "dense/efficient ≥ 1.5× time and ≥ 5× memory above the floor on 3B."]})
    if "predict" in r:
        p = r["predict"]
        rows = []
        for length, x in p["lengths"].items():
            for n in [n for n in PREDICT_VARIANTS if n in x["variants"]]:  # older results lack the last
                v = x["variants"][n]
                rows.append([length, n, fmt_s(v["seconds_per_prediction"]),
                             f"{v['residues_per_second']['median']:.0f}",
                             "1" if n == "fair-esm infer" else fmt_ratio(v["vs_fair_esm"]),
                             _gib(v["peak_bytes"]), _gib(v["max_memory_allocated"]), "–" if n == "fair-esm infer" else
                             f"{v['max_abs_ca_deviation_from_fair_esm']:.3f}",
                             "none" if x["chunk_size"] is None else str(x["chunk_size"])])
        lmb = p["lm_parameter_bytes"]
        out.append({"title": f"GPU suite (c): prediction against fair-esm's ESMFold.infer, {p['shape']}, same weights, "
                             f"batch 1, {p['config']['recycles']} recycles",
                    "columns": ["length", "model", "s/prediction median (min–max)", "residues/s", "time / fair-esm",
                                "peak GiB (its weights + activations)", "max_memory_allocated GiB (process)",
                                "max |ΔCα| vs fair-esm Å", "trunk chunk"],
                    "rows": rows,
                    "notes": [f"{p['config']['repeats']} interleaved rounds after {p['config']['warmup']} warm-up. "
                              "fair-esm: infer() + atom37 + copy to host; ours: predict_sequences (the same). LM "
                              "parameter bytes: " + ", ".join(f"{n} {fmt_mib(b)} MiB" for n, b in lmb.items())
                              + " (fair-esm float16, ours float32 / bf16); trunks float32. Peak: the model's own "
                              "weights + the highest tensor bytes allocated during one prediction (bench/common.py); "
                              "max_memory_allocated: the whole process, every model of the section (CUDA only). Trunk chunk: "
                              "'none' unless the length ran out of memory unchunked."]})
    if "ddp" in r:
        x = r["ddp"]
        if "skipped" in x:
            rows = [["skipped", x["skipped"], "–", "–", "–"]]
        else:
            rows = [[x["backend"], x["world_size"], f"{x['seconds_per_step']:.3f}",
                     "–" if "scaling_efficiency" not in x else f"{x['scaling_efficiency']:.2f}",
                     f"{x['max_parameter_spread_across_processes']:.1e}"]]
        out.append({"title": "GPU suite (d): DistributedDataParallel, paper_d4 + LoRTA r=8, 2 processes",
                    "columns": ["backend", "processes", "s/step per process", "single-process s/step ÷ DDP s/step",
                                "max parameter spread across processes"],
                    "rows": rows,
                    "notes": ["Each process trains on its own example (batch 1 each); the spread must be 0: DDP keeps "
                              "the processes' parameters identical. Efficiency 1 = no communication cost."]})
    if "compile" in r:
        import compile_step

        out += compile_step.tables(r["compile"], prefix="GPU suite (e): torch.compile")
    return out


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_gpu_suite(d: dict) -> tuple[list, str]:
    targets, parts = [], []
    if "lm" in d:
        for r in d["lm"]["results"]:
            for rank in (1, 8):
                q = r["ratios"][f"LoRTA/LoRA r={rank} time"]
                targets.append([f"GPU LoRTA/LoRA step time, r={rank}, {r['shape']} (all {r['layers']} layers)", "≤ 1",
                                fmt_ratio(q), verdict_at_most(q)])
    if "fold" in d:
        f = d["fold"]
        parts.append("Folding step (crop " + str(f["config"]["crop"]) + "): " + ", ".join(
            f"{v} {x['seconds_per_step']['median']:.3f} s" + (f" (MFU {x['mfu']:.1%})" if x["mfu"] is not None else "")
            for v, x in f["variants"].items()) + ".")
    if "predict" in d:
        p = d["predict"]
        parts.append("Prediction against fair-esm's ESMFold.infer (" + p["shape"] + "): " + ", ".join(
            f"L={L} ours {fmt_ratio(x['variants']['ours']['vs_fair_esm'])}, bf16 LM "
            f"{fmt_ratio(x['variants']['ours, bf16 LM']['vs_fair_esm'])} of its time" for L, x in p["lengths"].items()) + ".")
    if "ddp" in d and "skipped" not in d["ddp"]:
        x = d["ddp"]
        parts.append(f"DDP ({x['backend']}, {x['world_size']} processes): {x['seconds_per_step']:.3f} s/step, "
                     f"parameter spread {x['max_parameter_spread_across_processes']:.1e}.")
    elif "ddp" in d:
        parts.append(f"DDP: skipped ({d['ddp']['skipped']}).")
    return targets, " ".join(parts)


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "gpu_suite": ("7. GPU suite", read_gpu_suite),
}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--ddp-worker":
        ddp_worker(json.loads(sys.argv[2]))
        return
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--crop", type=int, default=0, help="training crop (0: 256, smoke 16)")
    p.add_argument("--no-bf16", action="store_true", help="float32 training steps on CUDA too")
    p.add_argument("--predict-shape", default="esmfold_v1", choices=tuple(PREDICT_SHAPES))
    p.add_argument("--predict-lengths", default="", help="comma-separated (default 256,512,1024)")
    p.add_argument("--recycles", type=int, default=0, help="recycles in the prediction comparison")
    args = p.parse_args()
    device = pick_device(args.device)
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("the GPU suite's shapes take hours on a CPU: run it with --device cuda, or --smoke on CPU")
    set_threads(args, device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    started, load_before = time.time(), load_average()
    if args.smoke:
        SIMULATED_OOM.update({"flops", f"predict {SMOKE_PREDICT_LENGTHS[-1]}"})
    result = {"sections": sections, "section_seconds": {},
              "simulated_out_of_memory": sorted(SIMULATED_OOM) if args.smoke else []}
    for name in sections:
        t0 = time.time()
        if name == "fold":
            result["fold"] = section_fold(args, device, args.smoke)
        elif name == "lm":
            result["lm"] = section_lm(args, device, args.smoke)
        elif name == "predict":
            result["predict"] = section_predict(args, device, args.smoke)
        elif name == "ddp":
            single = result.get("fold", {}).get("variants", {}).get("lorta r=8", {}).get("seconds_per_step")
            result["ddp"] = section_ddp(args, device, args.smoke, single)
        elif name == "compile":
            result["compile"] = section_compile(args, device, args.smoke)
        result["section_seconds"][name] = round(time.time() - t0, 1)
        log(f"[{name}] {result['section_seconds'][name]} s")
    result["tables"] = tables(result)
    finish("gpu_suite", args, device, started, load_before, result)


if __name__ == "__main__":
    main()
