#!/usr/bin/env python
"""Compare adapters × ranks on one configuration, each with its α search or a given α (paper Fig. 5, Table 6).

Entries are adapter:rank pairs, plus `none` (frozen LM) and `full` (LM fully trained), the two
ends of the comparison. With --alpha-search every lorta/lora entry runs the staged α search of
scripts/alpha_search.py in OUT/<adapter>-r<rank>/; with --alpha A it trains one run at α = A in
OUT/<adapter>-r<rank>/alpha-<A>/ (the same place a search would, so the two share runs).
Running the same command again resumes: finished runs are read back, an interrupted one continues.

Examples:
  python scripts/sweep.py --runs lora:1,lorta:1,lorta:8,lorta:64 --alpha-search --steps 60 --out /tmp/sweep
  python scripts/sweep.py --runs none,lora:8,lorta:8,full --alpha 16 --out runs/demo-sweep
  python scripts/sweep.py --config paper_d4 --runs lora:1,lorta:1,lorta:8,lorta:64 --alpha-search \\
      --set data.mmcif_dir=/data/pdb_mmcif --set data.chain_data_cache=/data/chain_data_cache.json --out runs/d4

Writes OUT/sweep.json (after every entry), OUT/sweep.md (paper Table 6 form and every entry) and
OUT/sweep.png (validation LDDT-Cα against trainable adapter parameters, log x), and prints the tables.
An entry whose α search diverged down to the floor is a result, shown in the tables (exit 0);
run the same command again to resume an interrupted sweep.
"""

import argparse
import logging
import sys
import time
from pathlib import Path


from esmfold_peft.runtime.cli import config_names, exit_code_table, positive_float, positive_int, run_main
from esmfold_peft.runtime.errors import EXIT_INTERRUPTED, EXIT_OK
from esmfold_peft.runtime.rundir import project_root
from esmfold_peft.fold.experiments.search import (DEFAULT_FLOOR, DEFAULT_MULTIPLIERS, parse_multipliers,
                                      search_base_config)
from esmfold_peft.fold.experiments.search_report import COMPLETED, fmt_alpha, sweep_markdown
from esmfold_peft.fold.experiments.sweep import parse_runs, run_sweep



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1] + "\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, metavar="ENTRIES",
                   help="comma-separated adapter:rank entries and/or none, full, e.g. lora:1,lorta:8,none,full")
    alpha = p.add_mutually_exclusive_group(required=True)
    alpha.add_argument("--alpha-search", action="store_true",
                       help="choose α for each lorta/lora entry by the staged search")
    alpha.add_argument("--alpha", type=positive_float, metavar="A", help="train every lorta/lora entry at α = A")
    p.add_argument("--config", default="demo", help=f"a config name in configs/ ({', '.join(config_names())}) or a "
                                                    ".py path (default: demo)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps of every run (train.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run, e.g. --set train.seed=1 (repeatable)")
    p.add_argument("--out", type=Path, help="sweep directory (default: runs/<config>-sweep)")
    p.add_argument("--multipliers", default=",".join(fmt_alpha(m) for m in DEFAULT_MULTIPLIERS), metavar="M1,M2",
                   help="with --alpha-search: stage 0 trains α = M·r for each M (default: 256,128)")
    p.add_argument("--floor", type=positive_float, default=DEFAULT_FLOOR, metavar="ALPHA_MIN",
                   help=f"with --alpha-search: never train α below this (default: {fmt_alpha(DEFAULT_FLOOR)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    runs = parse_runs(args.runs)
    multipliers = parse_multipliers(args.multipliers)
    cfg = search_base_config(args.config, args.set, args.steps)
    out = args.out or project_root() / "runs" / f"{cfg.name}-sweep"
    started = time.time()
    try:
        state = run_sweep(cfg, runs, out, alpha=args.alpha, search=args.alpha_search, multipliers=multipliers,
                          floor=args.floor, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(sweep_markdown(state))
    print(f"sweep directory: {out} (this invocation: {time.time() - started:.0f} s)")
    return EXIT_OK if state["status"] == COMPLETED else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
