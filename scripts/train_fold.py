#!/usr/bin/env python
"""Retrain the ESMFold folding trunk while ESM-2 is adapted with LoRTA / LoRA (or frozen / fully trained).

Examples:
  python scripts/train_fold.py --adapter lorta --rank 8                # the demo configuration (CPU, minutes)
  python scripts/train_fold.py --adapter lora --rank 1 --alpha 128 --out runs/lora-r1
  python scripts/train_fold.py --out runs/lora-r1 --resume             # continue an interrupted run
  python scripts/train_fold.py --config paper_d4 --set data.mmcif_dir=/data/pdb_mmcif \\
      --set data.chain_data_cache=/data/chain_data_cache.json           # the paper's experiment (GPU)
  torchrun --nproc_per_node 8 scripts/train_fold.py --config paper_d4 ...   # several GPUs / nodes

Exit status: 0 completed, 3 diverged (see summary.json), 130 interrupted (resume with --resume),
2 bad arguments or configuration.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esmfold_peft.fold.config import ADAPTERS, apply_overrides, load_config, project_root  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="a config name in configs/ (demo, paper_d4) or a .py path "
                                                    "(default: demo)")
    p.add_argument("--adapter", choices=ADAPTERS, help="lorta | lora | none (frozen LM) | full (LM trained)")
    p.add_argument("--rank", type=int, help="adapter rank r")
    p.add_argument("--alpha", type=float, help="adapter scale numerator (scale = alpha / rank; default alpha = r)")
    p.add_argument("--modes", help="LoRTA tensor modes, e.g. heads,matrices,layers (default) or heads")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--crop-size", type=int, help="train.crop_size")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: auto)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<config>-<adapter>[-r<rank>], "
                                            "numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.trunk.num_blocks=4 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p.parse_args(argv)


def resolve(args):
    cfg = load_config(args.config)
    flags = {"adapter.method": args.adapter, "adapter.rank": args.rank, "adapter.alpha": args.alpha,
             "adapter.modes": args.modes, "train.steps": args.steps, "train.seed": args.seed,
             "train.crop_size": args.crop_size, "train.device": args.device}
    apply_overrides(cfg, [f"{k}={v}" for k, v in flags.items() if v is not None])
    apply_overrides(cfg, args.set)
    return cfg


def default_out(cfg) -> Path:
    name = f"{cfg.name}-{cfg.adapter.method}"
    if cfg.adapter.method in ("lorta", "lora"):
        name += f"-r{cfg.adapter.rank}"
    base = project_root() / "runs" / name
    out, n = base, 1
    while (out / "config.json").exists():
        n += 1
        out = base.with_name(f"{name}-{n}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = resolve(args)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg)
        return 0
    if args.resume and args.out is None:
        print("error: --resume needs --out RUN_DIR", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.out is None:  # every process must name the same run
        print("error: with several processes (torchrun), give --out RUN_DIR", file=sys.stderr)
        return 2
    out = args.out or default_out(cfg)
    from esmfold_peft.fold.train import RUN_SETUP_ERRORS, train

    try:
        status = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except RUN_SETUP_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run directory: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
