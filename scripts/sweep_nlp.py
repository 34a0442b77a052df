#!/usr/bin/env python
"""Table 1 in small: LoRTA r=1,4,8, LoRA r=1,8, head only and full fine-tuning on one classification task.

Writes OUT/table.md (trainable parameters and metrics), OUT/metric_vs_parameters.png (log x) and
OUT/sweep.json; each entry's run directory is OUT/<method>-r<rank>, OUT/head-only or OUT/full. A
finished run is reused and an interrupted one resumed, so the command can simply be given again.
Entries are written as scripts/sweep.py writes them: adapter:rank, none (head only), full.

Examples:
  python scripts/sweep_nlp.py                                   # MiniLM on rt-polarity, ~20-30 min on 2 CPU cores
  python scripts/sweep_nlp.py --task corr2cause --out runs/sweep-c2c
  python scripts/sweep_nlp.py --runs lorta:4,lora:8,none --set train.steps=60
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.runtime.cli import add_set_argument, config_names, exit_code_table, run_main
from esmfold_peft.runtime.errors import EXIT_OK


def parse_args(argv=None):
    from esmfold_peft.nlp.glue import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2]
                                + "\n" + exit_code_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rt-polarity", choices=list(TASKS), help="classification task (default rt-polarity)")
    p.add_argument("--config", default="nlp_classify", help=f"a config name in configs/ "
                                                            f"({', '.join(config_names(nlp=True))}) or a .py path "
                                                            "(default: nlp_classify)")
    p.add_argument("--runs", "--methods", dest="runs", metavar="ENTRIES",
                   help="comma-separated adapter:rank entries and/or none (head only), full, as in sweep.py, e.g. "
                        "lorta:4,lora:8,none,full (default: lorta:1,lorta:4,lorta:8,lora:1,lora:8,none,full). "
                        "Deprecated, still read: the old name --methods and the old forms lorta-r4 and head-only")
    p.add_argument("--out", type=Path, help="sweep folder (default runs/nlp-sweep-<task>)")
    add_set_argument(p, "train.steps=60")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from esmfold_peft.nlp.config import load_config
    from esmfold_peft.nlp.sweep import parse_grid, run_sweep
    from esmfold_peft.runtime.config import apply_overrides
    from esmfold_peft.runtime.rundir import project_root

    grid = parse_grid(args.runs)
    out = args.out or project_root() / "runs" / f"nlp-sweep-{args.task}"
    load_config(args.config)  # a bad name fails here, before any training

    def make_config():
        return apply_overrides(load_config(args.config), [f"task={args.task}"])

    status = run_sweep(make_config, out, grid, overrides=args.set, progress=not args.no_progress)
    if status == EXIT_OK:
        print(f"done: table in {out}/table.md, plot in {out}/metric_vs_parameters.png, runs in {out}/<method>\n"
              f"next: cat {out}/table.md")
    else:
        print(f"stopped: give the same command again to continue ({out})")
    return status


if __name__ == "__main__":
    sys.exit(main())
