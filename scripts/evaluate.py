#!/usr/bin/env python
"""Evaluate predicted protein structures against reference structures, or a trained run on its data.

Scores every predicted chain against its reference chain: LDDT-Cα (AF2/OpenFold convention, both
the pooled global score and the mean of per-residue scores), Cα RMSD, GDT-TS, TM-score, and the
mean pLDDT when the predicted B-factors hold it. Writes report.json, report.md and PNG plots.
With --run, the run's model predicts its own validation (or training) chains through the code
training validates with, so the headline LDDT-Cα is the validation number training reports.

Examples:
  python scripts/evaluate.py --pred pred/1abc.pdb --ref ref/1abc.cif --out eval_out
  python scripts/evaluate.py --pred predictions/ --ref references/ --out eval_out
  python scripts/evaluate.py --run runs/demo-lorta-r8 --split val --out eval_val
  python scripts/evaluate.py --run runs/demo-lorta-r8 --checkpoint runs/demo-lorta-r8/checkpoints/last.pt \\
      --split train --num-recycles 3 --out eval_train
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path


from esmfold_peft.eval.chain_scores import MIN_COVERAGE, MIN_SEQUENCE_IDENTITY
from esmfold_peft.eval.evaluate import EvaluationRun, evaluate_paths
from esmfold_peft.eval.lddt import LDDT_CUTOFF
from esmfold_peft.eval.baselines import margin_text
from esmfold_peft.eval.report import calibration_markdown, summarize
from esmfold_peft.fold.experiments.evaluate_run import SPLITS, evaluate_run
from esmfold_peft.runtime.cli import (add_allow_other_base_argument, non_negative_int, positive_float, run_main)
from esmfold_peft.runtime.text import format_score
from esmfold_peft.runtime.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join([textwrap.fill(
            "Directories are matched by file stem (1abc.pdb with 1abc.cif.gz); formats: .pdb, .ent, "
            ".cif, .mmcif, optionally gzipped. Chains are paired by chain id (a single chain on each "
            "side is paired whatever its id), residues by residue number when the sequences agree "
            "under it, else by sequence alignment. A pair whose sequence identity (identical / paired "
            f"residues) is below {MIN_SEQUENCE_IDENTITY:g} or whose coverage (paired / reference residues) "
            f"is below {MIN_COVERAGE:g} is still scored, but flagged: a warning on stderr, ⚠ in report.md, "
            "low_identity_or_coverage in report.json; the prediction is probably not of that chain. "
            "Give either --pred and --ref, or --run."), textwrap.fill(
            f"Exit status: {EXIT_OK} if every file and chain was evaluated; {EXIT_SOME_FAILED} if some "
            "failed (an unparseable file, a chain without Cα or with non-finite coordinates, a chain that "
            f"cannot be paired; the others are still evaluated and reported); {EXIT_USAGE} for a malformed "
            "command line or an input or output that cannot be used at all (a missing path, a directory "
            "without structure files, a file against a directory, two directories without one matching stem, "
            "an unwritable --out, a run that cannot be loaded); "
            f"{EXIT_INTERRUPTED} if interrupted."), __doc__.split("\n\n", 2)[2].rstrip()]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    files = parser.add_argument_group("evaluate structure files")
    files.add_argument("--pred", type=Path, metavar="FILE_OR_DIR",
                       help="predicted structure file, or a directory of them")
    files.add_argument("--ref", type=Path, metavar="FILE_OR_DIR",
                       help="reference structure file, or a directory of them (matched to --pred by file stem)")
    files.add_argument("--lddt-cutoff", type=positive_float, metavar="ANGSTROM",
                       help=f"LDDT inclusion radius on reference distances (default: {LDDT_CUTOFF:g}; "
                            "a run is always evaluated with the default, as training validates)")
    run = parser.add_argument_group("evaluate a trained run on its data (as training validates)")
    run.add_argument("--run", type=Path, metavar="RUN_DIR", help="training run directory")
    run.add_argument("--split", choices=SPLITS, default="val",
                     help="the run's validation chains, or its training chains (cropped like validation); "
                          "default: %(default)s")
    run.add_argument("--checkpoint", type=Path, metavar="CKPT",
                     help="evaluate this training checkpoint (EMA weights when it has them) instead of the run's "
                          "exported model")
    run.add_argument("--num-recycles", type=non_negative_int, metavar="N",
                     help="trunk recycles (default: the run's val.num_recycles)")
    run.add_argument("--max-chains", type=non_negative_int, metavar="N",
                     help="the first N chains only, 0 for all (default: the run's data.val_max_chains for val, "
                          "all for train)")
    run.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change the run's config for this evaluation: paths of a moved run's inputs "
                          "(e.g. model.lm.path=…, data.root=…) or model.trunk.chunk_size=64 (repeatable)")
    add_allow_other_base_argument(run, note=": e.g. another language model given with --set model.lm.path=...")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory for report.json, report.md and the plots (created if needed)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars and no progress log lines, only the summary and warnings")
    parser.add_argument("--quiet", action="store_true", dest="no_progress",
                        help="deprecated: the old name of --no-progress (still accepted)")
    return parser


def _fmt(x: float | None) -> str:
    return format_score(x, 3)


def calibration_lines(cal: dict) -> list[str]:
    """The calibration statements of report.md (each with its n, or the reason it has none), for the terminal."""
    return [line[2:] for line in calibration_markdown(cal) if line.startswith("- ")]


def print_summary(run: EvaluationRun) -> None:
    """Where the report went, the headline numbers (aggregations named), flagged pairs and every failure."""
    written = ["report.json", "report.md"] + ([f"{len(run.files.figures)} figure(s)"] if run.files.figures else [])
    print(f"wrote {', '.join(written)} to {run.files.json.parent}")
    if run.chains:
        overall = summarize(run.chains)
        print(f"{overall['n_chains']} chain(s), means over chains: "
              f"LDDT-Cα {_fmt(overall['lddt_ca_global_pooled_mean_over_chains'])} (global pooled per chain), "
              f"GDT-TS {_fmt(overall['gdt_ts_mean_over_chains'])}, "
              f"TM-score {_fmt(overall['tm_score_mean_over_chains'])}, "
              f"RMSD {_fmt(overall['rmsd_ca_mean_over_chains'])} Å")
        if overall.get("baselines"):
            print(margin_text(overall["baselines"]["model"]["lddt_ca"], overall["baselines"]))
        for line in calibration_lines(overall["calibration"]):
            print(line)
    for chain in run.chains:
        if chain.low_identity_or_coverage:
            print(f"warning: {chain.similarity_warning()}", file=sys.stderr)
    if run.failures:
        print(f"{len(run.failures)} failure(s):", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure}", file=sys.stderr)
    print(f"next: read {run.files.json.parent / 'report.md'} (per-chain scores, flags and plots)")


def evaluate_files(args: argparse.Namespace) -> int:
    """--pred/--ref mode: score structure files, write the report, return the exit status."""
    cutoff = LDDT_CUTOFF if args.lddt_cutoff is None else args.lddt_cutoff
    run = evaluate_paths(args.pred, args.ref, args.out, lddt_cutoff=cutoff,
                         plots=not args.no_plots, progress=not args.no_progress)
    print_summary(run)
    return EXIT_OK if run.ok else EXIT_SOME_FAILED


def evaluate_trained_run(args: argparse.Namespace) -> int:
    """--run mode: validate the run on a split, write the report, return the exit status."""
    run = evaluate_run(args.run, args.out, split=args.split, checkpoint=args.checkpoint, device=args.device,
                       num_recycles=args.num_recycles, max_chains=args.max_chains, plots=not args.no_plots,
                       progress=not args.no_progress, overrides=args.set,
                       allow_other_base=args.allow_other_base)
    v = run.validation
    print(f"{args.split} split of {args.run}: validation LDDT-Cα {_fmt(v['lddt_ca'])} "
          f"({v['aggregation']}, {v['n_chains']} chain(s)), the number training reports")
    print_summary(run)
    return EXIT_OK if run.ok else EXIT_SOME_FAILED


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.no_progress else logging.INFO, format="%(levelname)s %(message)s")
    files_mode = args.pred is not None or args.ref is not None
    if args.run is not None:
        if files_mode:
            parser.error("give either --pred/--ref or --run, not both")
        if args.lddt_cutoff is not None and args.lddt_cutoff != LDDT_CUTOFF:
            parser.error(f"--lddt-cutoff applies to --pred/--ref; a run is evaluated as training validates "
                         f"({LDDT_CUTOFF:g} Å)")
        return evaluate_trained_run(args)
    if args.pred is None or args.ref is None:
        parser.error("--pred and --ref are both required (or give --run)")
    return evaluate_files(args)


if __name__ == "__main__":
    sys.exit(main())
