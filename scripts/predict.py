#!/usr/bin/env python
"""Predict protein structures from a FASTA file with a trained run or a fair-esm ESMFold checkpoint.

Writes one PDB per record (or mmCIF with --format cif; chains A, B, ..., each numbered from 1, pLDDT 0-100
in the B-factor column), its predicted aligned error (<id>.pae.npz, and <id>.pae.json in AlphaFold DB's
format) and a JSON summary per record (id, length, mean pLDDT, per-residue pLDDT, pTM, seconds), plus
predictions.json and summary.tsv (one row per FASTA record) for the whole file, and prints esm-fold's
line for each record on stderr. Multimers are records with chains joined by ':' (A:B); they are folded
as esm-fold folds them (a 25-residue poly-G linker, residue index +512 per chain), but the linker is
written nowhere and pTM leaves it out; their JSON adds each chain's pTM and the interface pTM (ipTM).

Examples:
  python scripts/predict.py -i seqs.fasta --run runs/demo-lorta-r8 -o predictions/
  python scripts/predict.py -i seqs.fasta --run runs/demo-lorta-r8 -o predictions/ --skip-existing
  python scripts/predict.py --fasta seqs.fasta --run runs/demo-lorta-r8 \\
      --checkpoint runs/demo-lorta-r8/checkpoints/last.pt --num-recycles 3 --device cuda --out pred/
  python scripts/predict.py -i seqs.fasta --esmfold esmfold_3B_v1.pt --lm esm2_t36_3B_UR50D.pt \\
      --chunk-size 64 --max-tokens-per-batch 512 --format cif --cpu-only -o pred/
  python scripts/predict.py -i mixed.fasta --esmfold esmfold_3B_v1.pt --adapter-library library/ \\
      --adapter auto -o pred/        # each record its own adapter (adapter=NAME in its description, or routed)
  torchrun --nproc_per_node 4 scripts/predict.py --fasta many.fasta --run-dir RUN --out pred/
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
from pathlib import Path


from esmfold_peft.runtime.cli import (add_allow_other_base_argument, add_set_argument, error, exit_code_table,
                                      non_negative_int, positive_float, positive_int, run_main)
from esmfold_peft.runtime.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, UserError
from esmfold_peft.fold.predict import (DEFAULT_MAX_TOKENS, DEFAULT_MERGE_TOLERANCE, STRUCTURE_FORMATS,
                                       MergeMismatchError, PredictionInterrupted, predict_fasta)
from esmfold_peft.fold.predict.library import BASE, DEFAULT_CAPACITY, DEFAULT_THRESHOLD, LibraryOptions
from esmfold_peft.runtime.session import world_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join([__doc__.split("\n\n", 2)[2].rstrip(), textwrap.fill(
            "FASTA records: ids are the first word of each header and name the output files (made "
            "filesystem-safe). Accepted residues: the 20 standard amino acids and X, any case; U->C, "
            "O->K and B/Z/J->X are rewritten (recorded in the JSON); a multimer's chains are joined by ':' "
            "in one record (A:B). Records that are empty, have an empty chain, hold other "
            "characters, exceed --max-length or repeat an earlier id are reported and skipped; the "
            "others are still predicted. A batch that runs out of memory is split and retried; predictions.json "
            "and summary.tsv are always written for what was done."), textwrap.fill(
            "Continuing: without --skip-existing a rerun into the same --out predicts every record again and "
            "replaces its files. With it, a record whose <stem>.json was written from the same sequence, model, "
            "--num-recycles and --format, with its files there, is kept (its summary reused); the others are "
            "predicted. On Ctrl-C the job writes predictions.json (status interrupted) and prints the command "
            "that continues it."), textwrap.fill(
            "Memory: before each batch of 400 residues or more the job logs an estimate of its peak memory (and "
            "of its time, at the rate of the batches before it); when the estimate exceeds the memory available "
            "it warns and names a --chunk-size that would fit."), textwrap.fill(
            "Confidence (predictions.json's 'confidence' says which case applies): B-factors are each atom's own "
            "pLDDT for a per-atom pLDDT head (Meta's ESMFold, --esmfold, or a run fine-tuned from it that left "
            "the head as it was), the residue's CA pLDDT on every atom for a head trained in the run (on CA "
            "only), and 0.00 for a head never trained (mean_plddt null). A pTM head that was never trained "
            "(loss.tm.weight 0, no pretrained ESMFold) gives no pTM, ipTM or PAE: null in the JSON, no "
            ".pae.npz or .pae.json, and a warning."), textwrap.fill(
            "Several processes (torchrun): the records are shared out by length, each process writes its "
            "records' files, and rank 0 merges one predictions.json. Name the run with --run-dir there, as in the "
            "example above: torchrun's own parser would take --run for its --run-path."), textwrap.fill(exit_code_table())]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--fasta", type=Path, required=True, metavar="FILE",
                        help="input FASTA file (optionally .gz)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", "--run-dir", dest="run", type=Path, metavar="RUN_DIR",
                       help="training run directory (config.json, model/, adapter/, checkpoints/); under torchrun "
                            "write --run-dir (torchrun's own parser takes --run for its --run-path)")
    model.add_argument("--esmfold", type=Path, metavar="CKPT",
                       help="a pretrained ESMFold instead of a training run: a fair-esm checkpoint (e.g. "
                            "esmfold_3B_v1.pt) or a Hugging Face EsmForProteinFolding folder (config.json + weights, "
                            "its ESM-2 inside)")
    parser.add_argument("--lm", metavar="LM",
                        help="with --esmfold: the ESM-2 it runs on: a fair-esm .pt file, a Hugging Face ESM directory "
                             "or a fair-esm name (default: a Hugging Face folder's own; for a fair-esm checkpoint, "
                             "which holds no LM, the one its esm_type names, e.g. esm2_t36_3B_UR50D from the torch "
                             "hub cache)")
    parser.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="with --run: use this training checkpoint (EMA weights when it has them) instead of "
                             "the run's exported model; the run's config.json describes the model")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                        help="output directory (created if needed); without --skip-existing a rerun replaces the "
                             "files of the same names")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep records an earlier job in --out predicted from the same sequence, model, "
                             "--num-recycles and --format (their files and <stem>.json there); predict the rest")
    parser.add_argument("--format", choices=STRUCTURE_FORMATS, default="pdb", dest="structure_format",
                        help="structure files: pdb (<stem>.pdb) or cif (<stem>.cif, mmCIF with the same atoms and "
                             "B-factors) (default: %(default)s)")
    parser.add_argument("--num-recycles", type=non_negative_int, metavar="N",
                        help="trunk recycles (default: the run's val.num_recycles; with --esmfold, as esm-fold: "
                             "the trunk's max_recycles passes, 3 recycles)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (default: cuda if available; "
                                                           "under torchrun each process's own GPU)")
    parser.add_argument("--cpu-only", action="store_true", help="predict on the CPU, as esm-fold's --cpu-only (the "
                                                                "same as --device cpu)")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="as esm-fold's: keep the language model's layers in CPU memory while predicting on a "
                             "GPU, each copied to the GPU for its own forward (less GPU memory, slower; adapters "
                             "apply unmerged); needs a GPU")
    parser.add_argument("--max-length", type=non_negative_int, default=1000, metavar="N",
                        help="most residues per record (all chains); longer records are reported and skipped; 0 "
                             "for no limit (default: %(default)s)")
    parser.add_argument("--max-tokens-per-batch", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help="token budget per batch: records are sorted by length and packed while "
                             "(records x longest length, linkers included) <= N (default: %(default)s)")
    parser.add_argument("--batch-residues", type=positive_int, dest="max_tokens_per_batch", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # the old name of --max-tokens-per-batch
    parser.add_argument("--chunk-size", type=positive_int, metavar="N",
                        help="chunk the trunk's triangular attention into N rows at a time (e.g. 128, 64, 32): less "
                             "memory for long sequences, the same structure (default: the model's setting, unchunked)")
    parser.add_argument("--no-merge", action="store_true",
                        help="keep the adapter unmerged (by default it is merged into ESM-2's weights after "
                             "checking on the first batch that outputs do not change)")
    add_set_argument(parser, "model.lm.path=/data/esm2_t12_35M_UR50D.pt (with --run)")
    parser.add_argument("--merge-tolerance", type=positive_float, default=DEFAULT_MERGE_TOLERANCE, metavar="X",
                        help="largest deviation accepted between merged and unmerged outputs, in Å for atom "
                             "positions and in points for pLDDT (default: %(default)g)")
    library = parser.add_argument_group("many adapters over one model (an adapter library)")
    library.add_argument("--adapter-library", type=Path, metavar="LIB",
                         help="a folder of adapters named by their folder names: each entry an adapter folder, or a "
                              "fine-tuning run (its adapter/ and trunk_adapter/), made for this model's weights; each "
                              "record runs with its own adapter, and records of different adapters share batches")
    library.add_argument("--adapter", metavar="NAME|base|auto",
                         help="with --adapter-library: the adapter of records whose description has no adapter=NAME "
                              "token: an entry's name, base (none), or auto (the entry whose training sequences the "
                              "record is closest to, by k-mer containment, else base) (default: base)")
    library.add_argument("--route-threshold", type=positive_float, default=DEFAULT_THRESHOLD, metavar="X",
                         help="auto: the least k-mer containment (0-1) that routes a record to an entry "
                              "(default: %(default)g)")
    library.add_argument("--adapter-cache", type=positive_int, default=DEFAULT_CAPACITY, metavar="N",
                         help="entries kept resident (least recently used evicted; default: %(default)s)")
    add_allow_other_base_argument(parser, "a run's adapters (--run) or a library's entries", ": e.g. another "
                                  "language model given with --set model.lm.path=...")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (the line per record and other log messages stay)")
    parser.add_argument("--quiet", action="store_true",
                        help="deprecated: --no-progress, and log warnings only (no line per record)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.esmfold is not None and (args.checkpoint is not None or args.set):
        parser.error("--checkpoint and --set change a training run; they go with --run, not --esmfold")
    if args.run is not None and args.lm is not None:
        parser.error("--lm goes with --esmfold (a run names its language model; move it with --set model.lm.path=...)")
    if args.cpu_only:
        if args.device not in (None, "cpu"):
            error(f"--cpu-only and --device {args.device} disagree: give one of them")
            return EXIT_USAGE
        args.device = "cpu"
    if args.cpu_offload and args.device == "cpu":
        error("--cpu-offload keeps the language model on the CPU while predicting on a GPU; with --cpu-only or "
              "--device cpu everything is on the CPU already: leave it out")
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        run = predict_fasta(args.fasta, args.run, args.out, checkpoint=args.checkpoint, esmfold=args.esmfold,
                            lm=args.lm, num_recycles=args.num_recycles, device=args.device,
                            max_length=args.max_length, max_tokens_per_batch=args.max_tokens_per_batch,
                            chunk_size=args.chunk_size, merge=not args.no_merge,
                            merge_tolerance=args.merge_tolerance, progress=not (args.no_progress or args.quiet),
                            overrides=args.set, structure_format=args.structure_format,
                            skip_existing=args.skip_existing, allow_other_base=args.allow_other_base,
                            cpu_offload=args.cpu_offload, library=library_options(args))
    except MergeMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except PredictionInterrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(_interrupted_line(stop, sys.argv[1:] if argv is None else list(argv)), file=sys.stderr)
        return EXIT_INTERRUPTED

    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK  # under torchrun rank 0 reports every process's records and gives the exit status
    _report(run, processes=world_size())
    return EXIT_SOME_FAILED if run.failures else EXIT_OK


def library_options(args) -> LibraryOptions | None:
    if args.adapter_library is None:
        if args.adapter is not None:
            raise UserError("--adapter chooses among the entries of --adapter-library; give the library too")
        return None
    return LibraryOptions(args.adapter_library, args.adapter or BASE, args.route_threshold, args.adapter_cache)


def continue_command(argv: list[str]) -> str:
    """The command that continues a job run with `argv`: the same, with --skip-existing (under torchrun, the
    script's part of it)."""
    script = os.path.relpath(__file__)
    script = script if not script.startswith("..") else os.path.abspath(__file__)
    extra = [] if "--skip-existing" in argv else ["--skip-existing"]
    command = shlex.join([script, *argv, *extra])
    if world_size() > 1:
        return f"the same torchrun launch of {command}"
    return f"python {command}"


def _interrupted_line(stop: PredictionInterrupted, argv: list[str]) -> str:
    kept = f" ({stop.n_reused} kept from an earlier job)" if stop.n_reused else ""
    return (f"interrupted: {stop.n_predicted} of {stop.n_records} record(s) predicted{kept}, their files and "
            f"predictions.json (status interrupted) in {stop.out_dir}; continue with: {continue_command(argv)}")


def _report(run, processes: int) -> None:
    check = run.merge_check
    if check is not None:
        print(f"adapter merged; merged vs unmerged on the first batch ({check.n_sequences} sequence(s)): "
              f"max deviation {check.max_position_deviation:.2g} Å (positions), "
              f"{check.max_plddt_deviation:.2g} (pLDDT), tolerance {check.tolerance:g}")
    by = f" by {processes} processes" if processes > 1 else ""
    pae = " + .pae.npz + .pae.json" if run.confidence is None or run.confidence.ptm else ""
    files = f".{run.structure_format}{pae} + .json"
    kept = f", {run.n_reused} of them kept from an earlier job" if run.n_reused else ""
    print(f"wrote {len(run.predicted)} structure(s) ({files} each){by}{kept}, {run.summary_path.name} and "
          f"{run.tsv_path.name} to {run.out_dir}")
    if run.failures:
        print(f"{len(run.failures)} record(s) failed:", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure}", file=sys.stderr)
    print(f"next: python scripts/evaluate.py --pred {run.out_dir} --ref REFERENCE_DIR --out {run.out_dir}/eval")


if __name__ == "__main__":
    sys.exit(main())
