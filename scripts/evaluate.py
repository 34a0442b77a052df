#!/usr/bin/env python
"""Evaluate predicted protein structures against reference structures.

Scores every predicted chain against its reference chain: LDDT-Cα (AF2/OpenFold convention, both
the pooled global score and the mean of per-residue scores), Cα RMSD, GDT-TS, TM-score, and the
mean pLDDT when the predicted B-factors hold it. Writes report.json, report.md and PNG plots.

Examples:
  python scripts/evaluate.py --pred pred/1abc.pdb --ref ref/1abc.cif --out eval_out
  python scripts/evaluate.py --pred predictions/ --ref references/ --out eval_out
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from esmfold_peft.eval.evaluate import EvaluationRun, evaluate_paths  # noqa: E402
from esmfold_peft.eval.lddt import LDDT_CUTOFF  # noqa: E402
from esmfold_peft.eval.report import summarize  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=textwrap.fill(
            "Directories are matched by file stem (1abc.pdb with 1abc.cif.gz); formats: .pdb, .ent, "
            ".cif, .mmcif, optionally gzipped. Chains are paired by chain id (a single chain on each "
            "side is paired whatever its id), residues by residue number when the sequences agree "
            "under it, else by sequence alignment. Exit status: 0 if every file and chain was "
            "evaluated, 1 if any failed (the others are still evaluated and reported)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    files = parser.add_argument_group("evaluate structure files")
    files.add_argument("--pred", type=Path, metavar="FILE_OR_DIR",
                       help="predicted structure file, or a directory of them")
    files.add_argument("--ref", type=Path, metavar="FILE_OR_DIR",
                       help="reference structure file, or a directory of them (matched to --pred by file stem)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory for report.json, report.md and the plots (created if needed)")
    parser.add_argument("--lddt-cutoff", type=float, default=LDDT_CUTOFF, metavar="ANGSTROM",
                        help="LDDT inclusion radius on reference distances (default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def print_summary(run: EvaluationRun) -> None:
    """Where the report went, the headline numbers (aggregations named), and every failure."""
    written = ["report.json", "report.md"] + ([f"{len(run.files.figures)} figure(s)"] if run.files.figures else [])
    print(f"wrote {', '.join(written)} to {run.files.json.parent}")
    if run.chains:
        overall = summarize(run.chains)
        print(f"{overall['n_chains']} chain(s), means over chains: "
              f"LDDT-Cα {_fmt(overall['lddt_ca_global_pooled_mean_over_chains'])} (global pooled per chain), "
              f"GDT-TS {_fmt(overall['gdt_ts_mean_over_chains'])}, "
              f"TM-score {_fmt(overall['tm_score_mean_over_chains'])}, "
              f"RMSD {_fmt(overall['rmsd_ca_mean_over_chains'])} Å")
    if run.failures:
        print(f"{len(run.failures)} failure(s):", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure}", file=sys.stderr)


def evaluate_files(args: argparse.Namespace) -> int:
    """--pred/--ref mode: score structure files, write the report, return the exit status."""
    try:
        run = evaluate_paths(args.pred, args.ref, args.out, lddt_cutoff=args.lddt_cutoff,
                             plots=not args.no_plots, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(run)
    return 0 if run.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each mode has its own argument group and function; --pred/--ref is the only one so far.
    if args.pred is None or args.ref is None:
        parser.error("--pred and --ref are both required")
    return evaluate_files(args)


if __name__ == "__main__":
    sys.exit(main())
