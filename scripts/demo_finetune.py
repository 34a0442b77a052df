#!/usr/bin/env python
"""Demonstrate fine-tuning a pretrained ESMFold with LoRTA on a family it never saw, on CPU.

One command, five stages, each in its own directory under --out: synthetic families made from TS50
chains (families/), a base model trained here from scratch on some of them (base/), that model
exported in fair-esm's ESMFold format (base_esmfold.pt), fine-tuned from the file with LoRTA on the
language model and the trunk, everything else frozen, on a new family (finetune/), and the held-out
variants of the new and the old families predicted and scored before and after (eval/). The table
goes to results.md and results.json and is printed at the end.

The new family is by default distant: variants of a base family's parent with 60% of residues
substituted (sequences the base never saw, on a fold it knows: the usual reason to fine-tune
ESMFold). --new-family unseen puts it on a fold the base never saw.

Rerunning the same command skips the finished stages and continues an interrupted run from its
checkpoint; other settings need another --out. The families are synthetic (sequence variants on
their parent's backbone; see docs/finetune.md), so the numbers show the mechanics of the recipe,
not what fine-tuning does for a real protein family.

Examples:
  python scripts/demo_finetune.py                                   # runs/demo-finetune (about 25 min on 2 CPU cores)
  python scripts/demo_finetune.py --out runs/ft-unseen --new-family unseen --new-rate 0.3   # a fold the base never saw
  python scripts/demo_finetune.py --smoke --out /tmp/ft-smoke       # every stage on the tiniest shapes (seconds)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from esmfold_peft.runtime.cli import (exit_code_table, non_negative_int, positive_float, positive_int,
                                      run_main)
from esmfold_peft.runtime.errors import EXIT_OK
from esmfold_peft.fold.finetune_demo import (NEW_FAMILY_KINDS, RESULTS_JSON, RESULTS_MD, DemoSettings,
                                             run_demo)

DEFAULTS = DemoSettings()

FLAGS = {  # flag -> DemoSettings field
    "families": "n_families", "rate": "rate", "base_steps": "base_steps", "base_lr": "base_lr",
    "finetune_steps": "finetune_steps", "finetune_lr": "finetune_lr", "rank": "rank", "seed": "seed",
    "threads": "threads", "new_family": "new_family", "new_rate": "new_rate",
}


def unit_fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n\n" + exit_code_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory (default: runs/demo-finetune, runs/demo-finetune-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiniest shapes and 2 steps per run: checks that every stage works, in seconds "
                             "(its numbers mean nothing)")
    parser.add_argument("--families", type=positive_int, metavar="N",
                        help=f"base families (default: {DEFAULTS.n_families})")
    parser.add_argument("--rate", type=unit_fraction, metavar="X",
                        help=f"fraction of residues substituted in each variant of a base family "
                             f"(default: {DEFAULTS.rate})")
    parser.add_argument("--new-family", choices=NEW_FAMILY_KINDS,
                        help="distant: the new family is on the first base family's fold, with more residues "
                             "substituted; unseen: on a fold the base never saw (default: "
                             f"{DEFAULTS.new_family})")
    parser.add_argument("--new-rate", type=unit_fraction, metavar="X",
                        help=f"fraction of residues substituted in each variant of the new family "
                             f"(default: {DEFAULTS.new_rate})")
    parser.add_argument("--base-steps", type=positive_int, metavar="N",
                        help=f"base training steps (default: {DEFAULTS.base_steps})")
    parser.add_argument("--base-lr", type=positive_float, metavar="LR",
                        help=f"base learning rate (default: {DEFAULTS.base_lr:g})")
    parser.add_argument("--finetune-steps", type=positive_int, metavar="N",
                        help=f"fine-tuning steps (default: {DEFAULTS.finetune_steps})")
    parser.add_argument("--finetune-lr", type=positive_float, metavar="LR",
                        help=f"fine-tuning learning rate of the LoRTA factors (default: {DEFAULTS.finetune_lr:g})")
    parser.add_argument("--rank", type=positive_int, metavar="R", help=f"LoRTA rank (default: {DEFAULTS.rank})")
    parser.add_argument("--seed", type=non_negative_int, metavar="S",
                        help=f"seed of the families and runs (default: {DEFAULTS.seed})")
    parser.add_argument("--threads", type=non_negative_int, metavar="N",
                        help=f"torch CPU threads, 0 for torch's default (default: {DEFAULTS.threads})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from esmfold_peft.runtime.rundir import project_root

    changes = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag) is not None}
    settings = DemoSettings.smoke(**changes) if args.smoke else DemoSettings(**changes)
    out = args.out or project_root() / "runs" / ("demo-finetune-smoke" if args.smoke else "demo-finetune")
    results = run_demo(settings, out, progress=not args.no_progress)
    print((out / RESULTS_MD).read_text(), end="")
    before, after = results["new_family"]["before"]["lddt_ca"], results["new_family"]["after"]["lddt_ca"]
    print(f"\nnew family, LDDT-Cα: {before:.3f} before, {after:.3f} after fine-tuning; results in {out / RESULTS_MD} "
          f"and {out / RESULTS_JSON}")
    print(f"next: python scripts/predict.py --fasta SEQS.fasta --run {out / 'finetune'} --out PRED_DIR   "
          "(the fine-tuned model, adapter merged); the recipe for Meta's ESMFold is in docs/finetune.md")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
