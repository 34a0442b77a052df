"""Benchmark 4: prediction throughput (residues per second) of the folding model at several lengths.

The model is built from a named config (`--config`; default `demo` on CPU: 2 trunk blocks, c_s 128,
c_z 32, the demo's ESM-2 8M; `paper_d4` on CUDA: 12 blocks, c_s 1024, c_z 128, a randomly
initialised 35M-shaped ESM-2) with a LoRTA r=8 adapter (random nonzero factors) merged into the LM.
One prediction is one call of `esmfold_peft.fold.predict.predict_sequences` (what `predict.py`
runs per batch) for one sequence: encoding, the model's forward in eval mode under
`torch.no_grad()`, float32, with the config's validation recycles (`val.num_recycles`, as
predict's default), atom37 conversion and the copy to the host (file writing excluded), on a
random sequence of the given length. The lengths are interleaved and repeated.
paper_d4 on CPU costs about 1.3 s at 64 residues and 44 s at 256 with no recycle (one thread):
too slow for this benchmark's budget, hence the demo model there.

    python bench/predict_throughput.py [--smoke] [--config paper_d4] [--recycles 0] [--lengths 64,128,256]
"""

from __future__ import annotations

import time
import warnings

import torch

from common import (ROOT, SMOKE_RUNS, autocast, base_parser, finish, fmt_mib, fmt_s, interleaved, load_average,
                    merge_random_adapter, peak_memory, pick_device, resident_bytes, run_conf, set_threads, summary)

DEFAULTS = {"cpu": dict(config="demo", lengths=(64, 128, 256), repeats=5, steps=1, warmup=1),
            "cuda": dict(config="paper_d4", lengths=(64, 128, 256), repeats=5, steps=3, warmup=2)}


def build_predictor(config: str, smoke: bool, device: torch.device, seed: int):
    from esmfold_peft.fold.model.build import build_model
    from esmfold_peft.fold.run.config import load_config
    from esmfold_peft.fold.run.resolve import fill_defaults

    from fold_step import fold_config

    if smoke or config == "paper_d4":
        cfg = fold_config(smoke)
    else:
        cfg = load_config(config)
        cfg.adapter.method, cfg.adapter.rank, cfg.adapter.alpha = "lorta", 8, 16.0
        fill_defaults(cfg)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="language model .* is RANDOMLY INITIALISED")
        try:
            model = build_model(cfg)
        except Exception as exc:  # e.g. the demo LM checkpoint is absent: same shape, random weights
            if not cfg.model.lm.path:
                raise
            print(f"could not load {cfg.model.lm.path} ({exc}); using a random LM of the same shape")
            cfg.model.lm.path, cfg.model.lm.random_init = "", True
            model = build_model(cfg)
    merge_random_adapter(model, seed)
    return model.to(device).eval(), cfg


def random_sequence(length: int, seed: int) -> str:
    from openfold.np.residue_constants import restypes

    g = torch.Generator().manual_seed(seed + length)
    return "".join(restypes[i] for i in torch.randint(0, 20, (length,), generator=g).tolist())


def tables(r) -> list:
    rows = []
    for length in r["config"]["lengths"]:
        x = r["lengths"][str(length)]
        rows.append([length, fmt_s(x["seconds_per_prediction"]), f"{x['residues_per_second']['median']:.1f} "
                     f"({x['residues_per_second']['min']:.1f}–{x['residues_per_second']['max']:.1f})",
                     fmt_mib(x["peak_bytes"])])
    m = r["model"]
    prec = "bf16 autocast" if r["bf16"] else "float32"
    rec = r["config"]["recycles"]
    return [{"title": f"Prediction throughput: {m['config']} ({m['trunk_blocks']} trunk blocks, c_s {m['c_s']}, "
                      f"c_z {m['c_z']}, {m['lm']}), merged LoRTA r=8, {rec} recycle{'s' if rec != 1 else ''} "
                      f"({rec + 1} trunk passes), {prec}",
             "columns": ["length", "s/prediction median (min–max)", "residues/s median (min–max)", "peak MiB"],
             "rows": rows,
             "notes": [f"{r['config']['repeats']} interleaved rounds of {r['config']['steps']} prediction(s) per "
                       f"length after {r['config']['warmup']} warm-up; batch 1, random sequences; residues/s = "
                       "length / seconds per prediction."]}]


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_predict(d: dict) -> tuple[list, str]:
    ls = d["config"]["lengths"]
    rps = {L: d["lengths"][str(L)]["residues_per_second"]["median"] for L in ls}
    sec = {L: d["lengths"][str(L)]["seconds_per_prediction"]["median"] for L in ls}
    rec = d["config"]["recycles"]
    lo, hi = ls[0], ls[-1]
    return [], (
        "Per prediction the LM and the sequence track grow with L (their attention with L²), the pair track with "
        "L² and the triangular updates with L³, so the cost per residue grows with length; residues per second: "
        + ", ".join(f"{rps[L]:.1f} at {L}" for L in ls)
        + f" ({sec[hi] / sec[lo]:.1f}× the time for {hi / lo:.0f}× the residues from {lo} to {hi}). "
        f"With {rec} recycle(s) the trunk runs {rec + 1} times per prediction and the LM once.")


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "predict_throughput": ("4. Prediction throughput", read_predict),
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="", help="named config (default: demo on CPU, paper_d4 on CUDA)")
    p.add_argument("--recycles", type=int, default=-1,
                   help="extra trunk passes (default: the config's val.num_recycles)")
    p.add_argument("--lengths", default="", help="comma-separated lengths (default 64,128,256)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (predict runs float32)")
    args = p.parse_args()
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = run_conf(args, DEFAULTS[device.type], smoke=dict(config="paper_d4", lengths=(8, 16), **SMOKE_RUNS))
    if args.config:
        conf["config"] = args.config
    if args.lengths:
        conf["lengths"] = tuple(int(x) for x in args.lengths.split(","))
    bf16 = device.type == "cuda" and args.bf16
    model, cfg = build_predictor(conf["config"], args.smoke, device, args.seed)
    conf["recycles"] = args.recycles if args.recycles >= 0 else (0 if args.smoke else int(cfg.val.num_recycles))
    from esmfold_peft.fold.predict import predict_sequences

    sequences = {L: random_sequence(L, args.seed) for L in conf["lengths"]}

    def predict(L):
        def run():
            with autocast(device, bf16):
                predict_sequences(model, [sequences[L]], device, conf["recycles"])
        return run

    runs = {str(L): predict(L) for L in conf["lengths"]}
    print(f"{cfg.name} model, merged LoRTA r=8, lengths {conf['lengths']}, recycles {conf['recycles']}, {device}",
          flush=True)
    times = interleaved(runs, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed)
    memory = {L: peak_memory(fn, device, lambda: resident_bytes(model)) for L, fn in runs.items()}
    lm_path = cfg.model.lm.path.replace(str(ROOT) + "/", "")
    result = {"config": {**conf, "lengths": list(conf["lengths"])}, "bf16": bf16,
              "model": {"config": cfg.name, "lm": cfg.model.lm.name + (" (random init)" if cfg.model.lm.random_init
                                                                       else f" ({lm_path})"),
                        "trunk_blocks": cfg.model.trunk.num_blocks, "c_s": cfg.model.trunk.sequence_state_dim,
                        "c_z": cfg.model.trunk.pairwise_state_dim},
              "lengths": {L: {"seconds_per_prediction": summary(times[L]),
                              "wall_seconds_per_prediction": summary(times[L + "@wall"]),
                              "residues_per_second": summary([int(L) / t for t in times[L]]),
                              "peak_bytes": memory[L]} for L in runs}}
    result["tables"] = tables(result)
    finish("predict_throughput", args, device, started, load_before, result)


if __name__ == "__main__":
    main()
