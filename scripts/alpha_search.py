#!/usr/bin/env python
"""Choose the adapter scale α by the paper's staged halving search (LoRTA paper, App. D.4; see docs/method.md).

Trains α = 256·r and 128·r and keeps the better by final validation LDDT-Cα; if both diverge
(the trainer's logged rule: non-finite loss or gradient norm, or loss above
train.diverge_loss_threshold), halves on to 64·r and 32·r, and so on until a stage converges or
the floor is reached. Every candidate is an ordinary run in OUT/alpha-<α>/; running the same
command again resumes: finished candidates are read back, an interrupted one continues.

Examples:
  python scripts/alpha_search.py --adapter lorta --rank 8                  # demo config (CPU)
  python scripts/alpha_search.py --adapter lora --rank 1 --steps 60 --out /tmp/search-lora-r1
  python scripts/alpha_search.py --adapter lorta --rank 8 --multipliers 256,128 --floor 4 --schedule
  python scripts/alpha_search.py --config paper_d4 --adapter lorta --rank 8 \\
      --set data.mmcif_dir=/data/pdb_mmcif --set data.chain_data_cache=/data/chain_data_cache.json

Writes OUT/search.json (after every candidate) and OUT/search.md (paper Table 6 form and every
candidate), and prints the tables.
Exit 3 means every α down to the floor diverged; run the same command again to resume an
interrupted search; a stored run of another configuration is refused (exit 2).
"""

import argparse
import logging
import sys
import time
from pathlib import Path


from esmfold_peft.runtime.cli import exit_code_table, positive_float, positive_int, run_main
from esmfold_peft.runtime.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK
from esmfold_peft.fold.run.config import ADAPTERS
from esmfold_peft.runtime.rundir import project_root
from esmfold_peft.fold.experiments.search import (ALL_DIVERGED, CHOSEN, DEFAULT_FLOOR, DEFAULT_MULTIPLIERS,
                                      alpha_search, fmt_alpha, parse_multipliers, require_alpha,
                                      search_base_config, search_markdown, stages)



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1] + "\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, choices=ADAPTERS, help="lorta | lora (none and full have no α)")
    p.add_argument("--rank", type=positive_int, required=True, help="adapter rank r")
    p.add_argument("--config", default="demo", help="a config name in configs/ or a .py path (default: demo)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps of every candidate (train.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every candidate, e.g. --set train.seed=1 (repeatable)")
    p.add_argument("--out", type=Path, help="search directory (default: runs/<config>-alpha-search-<adapter>-r<rank>)")
    p.add_argument("--multipliers", default=",".join(fmt_alpha(m) for m in DEFAULT_MULTIPLIERS), metavar="M1,M2",
                   help="stage 0 trains α = M·r for each M (default: 256,128); later stages halve on")
    p.add_argument("--floor", type=positive_float, default=DEFAULT_FLOOR, metavar="ALPHA_MIN",
                   help=f"never train α below this; all diverged down to it ends the search "
                        f"(default: {fmt_alpha(DEFAULT_FLOOR)})")
    p.add_argument("--schedule", action="store_true", help="print the α of every stage down to the floor and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    require_alpha(args.adapter)
    multipliers = parse_multipliers(args.multipliers)
    plan = stages(args.rank, multipliers, args.floor)
    cfg = search_base_config(args.config, args.set, args.steps)
    if args.schedule:
        for i, alphas in enumerate(plan):
            print(f"stage {i}: α = " + ", ".join(f"{fmt_alpha(a)} ({fmt_alpha(a / args.rank)}·r)" for a in alphas))
        return EXIT_OK
    out = args.out or project_root() / "runs" / f"{cfg.name}-alpha-search-{args.adapter}-r{args.rank}"
    started = time.time()
    try:
        state = alpha_search(cfg, args.adapter, args.rank, out, multipliers, args.floor,
                             progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(search_markdown(state))
    print(f"search directory: {out} (this invocation: {time.time() - started:.0f} s)")
    return {CHOSEN: EXIT_OK, ALL_DIVERGED: EXIT_DIVERGED}.get(state["status"], EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
