#!/usr/bin/env python
"""Retrain the ESMFold folding trunk, or fine-tune a pretrained ESMFold, with LoRTA / LoRA on ESM-2 and/or the trunk.

Examples:
  python scripts/train_fold.py --adapter lorta --rank 8                # the demo configuration (CPU, minutes)
  python scripts/train_fold.py --adapter lora --rank 1 --alpha 128 --out runs/lora-r1
  python scripts/train_fold.py --out runs/lora-r1 --resume             # continue a run with its own config
  python scripts/train_fold.py --out runs/lora-r1 --resume --steps 600 # ... and train it further
  python scripts/train_fold.py --config paper_d4 --set data.mmcif_dir=/data/pdb_mmcif \\
      --set data.chain_data_cache=/data/chain_data_cache.json           # the paper's experiment (GPU)
  torchrun --nproc_per_node 8 scripts/train_fold.py --config paper_d4 --out runs/d4 ...   # several GPUs / nodes
  python scripts/train_fold.py --config esmfold_finetune --set model.init_from=esmfold_3B_v1.pt \\
      --set model.lm.path=esm2_t36_3B_UR50D.pt --set data.source=dir --set data.train_dir=my_family/ \\
      --set data.val_dir=my_family_val/ --adapter-scope both   # fine-tune Meta's ESMFold on your family (GPU)
  python scripts/train_fold.py --adapter lorta --log tensorboard       # and: tensorboard --logdir runs/<run>/tensorboard

--resume reads the run's own config.json: flags given with it override only what they name, and only
the run's length (--steps), its cadence, its device and the paths of its inputs may change.
The method (LoRTA's tensor, its modes and the scale alpha/r) is described in docs/method.md.
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.adapters import is_adapted
from esmfold_peft.fold.run.config import ADAPTERS, SCOPES
from esmfold_peft.runtime.cli import (add_run_arguments, add_set_argument, config_names, config_yaml, exit_code_table,
                                      loggers_flag, overrides_from, positive_float, positive_int, run_main)
from esmfold_peft.runtime.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, UserError
from esmfold_peft.runtime.session import world_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n", 2)[2] + "\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a config name in configs/ ({', '.join(config_names())}) or a .py path "
                                    "(default: demo; with --resume the run's own config is used)")
    p.add_argument("--adapter", choices=ADAPTERS, help="lorta | lora | none (frozen LM) | full (LM trained)")
    p.add_argument("--rank", type=positive_int, help="adapter rank r")
    p.add_argument("--alpha", type=positive_float, help="adapter scale numerator: scale = alpha / rank "
                                                         "(default: alpha = r, scale 1; stored resolved)")
    p.add_argument("--modes", help="LoRTA tensor modes, comma-separated among heads, matrices, layers "
                                   "(default heads,matrices,layers = one tensor; 'all' is the same); LoRTA only")
    p.add_argument("--adapter-scope", choices=SCOPES,
                   help="where the adapter goes: lm (ESM-2's attention, default), trunk (the folding trunk's sequence "
                        "and triangle attention, one CP tensor per family) or both (adapter.scope)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (train.steps); with --resume, extends the run")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--crop-size", type=positive_int, help="train.crop_size")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: auto)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<config>-<adapter>[-r<rank>], "
                                            "numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                                                         "with the config stored in the run")
    add_set_argument(p, "model.trunk.num_blocks=4")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (yaml.safe_load reads it back) and exit")
    add_run_arguments(p)
    return p.parse_args(argv)


def flag_overrides(args) -> list[str]:
    """The `key=value` overrides the explicit flags stand for (flags not given change nothing)."""
    flags = {"adapter.method": args.adapter, "adapter.rank": args.rank, "adapter.alpha": args.alpha,
             "adapter.modes": args.modes, "adapter.scope": args.adapter_scope, "train.steps": args.steps, "train.seed": args.seed,
             "train.crop_size": args.crop_size, "train.device": args.device, "train.keep": args.keep,
             "train.loggers": loggers_flag(args)}
    return overrides_from(flags, args.set)


def check_flags(args, method: str) -> None:
    if args.modes is not None and method != "lorta":
        raise UserError(f"--modes applies to LoRTA only (this run's adapter is {method})")
    if (args.rank is not None or args.alpha is not None or args.adapter_scope is not None) \
            and not is_adapted(method):
        raise UserError(f"--rank, --alpha and --adapter-scope apply to lorta and lora (this run's adapter is {method})")


def resolve(args):
    from esmfold_peft.fold.run.resolve import new_run_config, resume_run_config, stored_run_config

    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR")
        stored = stored_run_config(args.out)  # the one read of the run's config.json in this command
        if args.config is not None:
            logging.info("--resume continues the run with its own config.json; --config %s is not read", args.config)
        check_flags(args, args.adapter or stored.adapter.method)
        return resume_run_config(args.out, flag_overrides(args), stored=stored)
    cfg = new_run_config(args.config or "demo", flag_overrides(args))
    check_flags(args, cfg.adapter.method)
    return cfg


def default_out(cfg) -> Path:
    from esmfold_peft.runtime.rundir import project_root

    name = f"{cfg.name}-{cfg.adapter.method}"
    if is_adapted(cfg):
        name += f"-r{cfg.adapter.rank}"
    base = project_root() / "runs" / name
    out, n = base, 1
    while (out / "config.json").exists():
        n += 1
        out = base.with_name(f"{name}-{n}")
    return out


NEXT_STEP = {
    EXIT_OK: "next: python scripts/predict.py --fasta SEQS.fasta --run {out} --out {out}/predictions   "
             "or   python scripts/evaluate.py --run {out} --split val --out {out}/eval",
    EXIT_DIVERGED: "the run diverged (see {out}/summary.json); try a smaller --alpha, or "
                   "python scripts/alpha_search.py to search it",
    EXIT_INTERRUPTED: "continue with: python scripts/train_fold.py --out {out} --resume",
}


def kept_headline(out: Path) -> str | None:
    """The kept model's validation LDDT-Cα beside the sequence-only baselines on the same chains, or None."""
    from esmfold_peft.eval.baselines import margin_text
    from esmfold_peft.runtime.rundir import RunDir

    run = RunDir(out)
    if not run.summary.is_file():
        return None
    summary = run.read_summary()
    value = summary.get("best_value") if summary.get("kept") == "best" else summary.get("last_value")
    base = summary.get("val_baselines")
    if value is None or not base:
        return None
    which = f"{summary.get('kept')}, step {summary.get('kept_step')}"
    return (f"validation {margin_text(value, base)}; kept model ({which}), {base['n_chains']} chain(s); "
            "docs/method.md explains the baselines")


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = resolve(args)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return EXIT_OK
    if world_size() > 1 and args.out is None:  # every process must name the same run
        raise UserError("with several processes (torchrun), give --out RUN_DIR")
    out = args.out or default_out(cfg)
    from esmfold_peft.fold.train import train

    status = train(cfg, out, resume=args.resume, progress=not args.no_progress, resolved=True)
    print(f"run directory: {out}")
    headline = kept_headline(out)
    if headline:
        print(headline)
    print(NEXT_STEP[status].format(out=out))
    return status


if __name__ == "__main__":
    sys.exit(main())
