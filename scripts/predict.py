#!/usr/bin/env python
"""Predict protein structures from a FASTA file with a trained run (its adapted ESM-2, trunk and heads).

Writes one PDB per record (chain A, residues numbered from 1, pLDDT 0-100 in the B-factor column)
and a JSON summary per record (id, length, mean pLDDT, pTM, seconds), plus predictions.json for
the whole file.

Examples:
  python scripts/predict.py --fasta seqs.fasta --run runs/demo-lorta-r8 --out predictions/
  python scripts/predict.py --fasta seqs.fasta --run runs/demo-lorta-r8 \\
      --checkpoint runs/demo-lorta-r8/checkpoints/last.pt --num-recycles 3 --device cuda --out pred/
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from esmfold_peft.runtime.cli import (add_set_argument, exit_code_table, non_negative_int, positive_float,  # noqa: E402
                                      positive_int, run_main)
from esmfold_peft.runtime.errors import EXIT_OK, EXIT_SOME_FAILED  # noqa: E402
from esmfold_peft.fold.predict import DEFAULT_MERGE_TOLERANCE, MergeMismatchError, predict_fasta  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join([__doc__.split("\n\n", 2)[2].rstrip(), textwrap.fill(
            "FASTA records: ids are the first word of each header and name the output files (made "
            "filesystem-safe). Accepted residues: the 20 standard amino acids and X, any case; U->C, "
            "O->K and B/Z/J->X are rewritten (recorded in the JSON). Records that are empty, hold other "
            "characters, exceed --max-length or repeat an earlier id are reported and skipped; the "
            "others are still predicted. A batch that runs out of memory is split and retried; predictions.json "
            "is always written for what was done."), textwrap.fill(exit_code_table())]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fasta", type=Path, required=True, metavar="FILE", help="input FASTA file (optionally .gz)")
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                        help="training run directory (config.json, model/, adapter/, checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="use this training checkpoint (EMA weights when it has them) instead of the run's "
                             "exported model; the run's config.json describes the model")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory (created if needed; files of the same names are replaced)")
    parser.add_argument("--num-recycles", type=non_negative_int, metavar="N",
                        help="trunk recycles (default: the run's val.num_recycles)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--max-length", type=positive_int, default=1000, metavar="N",
                        help="longest sequence predicted; longer records are reported and skipped "
                             "(default: %(default)s)")
    parser.add_argument("--batch-residues", type=positive_int, default=1024, metavar="N",
                        help="residue budget per batch: sequences are sorted by length and packed while "
                             "(sequences x longest length) <= N (default: %(default)s)")
    parser.add_argument("--no-merge", action="store_true",
                        help="keep the adapter unmerged (by default it is merged into ESM-2's weights after "
                             "checking on the first batch that outputs do not change)")
    add_set_argument(parser, "model.lm.path=/data/esm2_t12_35M_UR50D.pt")
    parser.add_argument("--merge-tolerance", type=positive_float, default=DEFAULT_MERGE_TOLERANCE, metavar="X",
                        help="largest deviation accepted between merged and unmerged outputs, in Å for atom "
                             "positions and in points for pLDDT (default: %(default)g)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        run = predict_fasta(args.fasta, args.run, args.out, checkpoint=args.checkpoint,
                            num_recycles=args.num_recycles, device=args.device, max_length=args.max_length,
                            batch_residues=args.batch_residues, merge=not args.no_merge,
                            merge_tolerance=args.merge_tolerance, progress=not args.quiet, overrides=args.set)
    except MergeMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED

    check = run.merge_check
    if check is not None:
        print(f"adapter merged; merged vs unmerged on the first batch ({check.n_sequences} sequence(s)): "
              f"max deviation {check.max_position_deviation:.2g} Å (positions), "
              f"{check.max_plddt_deviation:.2g} (pLDDT), tolerance {check.tolerance:g}")
    print(f"wrote {len(run.predicted)} structure(s) (.pdb + .json each) and {run.summary_path.name} to {run.out_dir}")
    if run.failures:
        print(f"{len(run.failures)} record(s) failed:", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure}", file=sys.stderr)
    print(f"next: python scripts/evaluate.py --pred {run.out_dir} --ref REFERENCE_DIR --out {run.out_dir}/eval")
    return EXIT_SOME_FAILED if run.failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
