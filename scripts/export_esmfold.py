#!/usr/bin/env python
"""Write a trained run's folding model as a fair-esm ESMFold checkpoint (the format of esmfold_3B_v1.pt),
or as a Hugging Face ESMFold folder (--format hf).

The file holds the trunk, embeddings and heads (a trunk adapter merged into the trunk's weights)
and, as fair-esm's own files, no language model: its cfg names the ESM-2 (esm_type, derived from
the run's language model). fair-esm's ESMFold reads it, and so does this project: predict with
--esmfold FILE --lm LM, or start a new run from it with --set model.init_from=FILE. A run whose
language model carries an adapter (adapter.scope lm or both) or was fully trained needs --lm-out:
that ESM-2 is written too (adapter merged), to be given as the language model. With --format hf, --out
is a folder that transformers' EsmForProteinFolding.from_pretrained loads (config.json and model.safetensors,
language model included, every adapter merged); predict with --esmfold FOLDER.

Examples:
  python scripts/export_esmfold.py --run runs/demo-lorta-r8 --out esmfold_demo.pt --lm-out esm2_demo.pt  # the demo
  python scripts/export_esmfold.py --run runs/base --out base_esmfold.pt   # a run whose ESM-2 stayed frozen
  python scripts/export_esmfold.py --run runs/finetune --out finetuned.pt --lm-out esm2_finetuned.pt
  python scripts/export_esmfold.py --run runs/base --checkpoint runs/base/checkpoints/last.pt --out step.pt
  python scripts/export_esmfold.py --run runs/demo-lorta-r8 --format hf --out esmfold_demo_hf  # transformers' folder
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from esmfold_peft.runtime.cli import (add_allow_other_base_argument, add_set_argument, exit_code_table, run_main)
from esmfold_peft.runtime.errors import EXIT_OK, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n\n" + exit_code_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="training run directory")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.pt|DIR",
                        help="the ESMFold checkpoint to write (replaced atomically if it exists; a .sha256 "
                             "checksum is written beside it); with --format hf, the folder to write")
    parser.add_argument("--format", choices=("fair-esm", "hf"), default="fair-esm",
                        help="fair-esm: one .pt file without the language model (default); hf: a Hugging Face "
                             "EsmForProteinFolding folder (config.json + model.safetensors) with it")
    parser.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="export this training checkpoint (EMA weights when it has them) instead of the run's "
                             "exported model")
    parser.add_argument("--lm-out", type=Path, metavar="FILE.pt",
                        help="also write the run's language model (adapter merged) as a fair-esm ESM-2 file; "
                             "required when the run adapted or trained it. Name it esm2_*.pt: fair-esm's own "
                             "loader recognises ESM-2 files by name")
    parser.add_argument("--esm-type", metavar="TYPE",
                        help="the esm_type to record (default: derived from the run's language model, e.g. "
                             "esm2_8M_270K for esm2_t6_8M_UR50D)")
    add_set_argument(parser, "model.lm.path=/data/esm2_t6_8M_UR50D.pt (a moved language model)")
    add_allow_other_base_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "hf" and args.lm_out is not None:
        parser.error("--lm-out goes with --format fair-esm (a Hugging Face ESMFold folder holds its language model)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint, export_hf_esmfold

    if args.format == "hf":
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"{args.out}: is a file; --format hf writes a folder (e.g. {args.out.with_suffix('')}_hf)")
        model, cfg = load_trained_model(args.run, args.checkpoint, overrides=args.set,
                                        allow_other_base=args.allow_other_base)
        written = export_hf_esmfold(model, cfg, args.out, esm_type=args.esm_type)
        merged = " and ".join(written["adapters_merged"]) or "no"
        print(f"wrote {written['path']} (Hugging Face EsmForProteinFolding; {merged} adapter merged)")
        print(f"next: python scripts/predict.py --fasta SEQS.fasta --esmfold {written['path']} --out PRED_DIR"
              f"   or   EsmForProteinFolding.from_pretrained({written['path']!r}) with transformers")
        return EXIT_OK
    if args.out.is_dir():
        raise UserError(f"{args.out}: is a directory; give the file to write (e.g. {args.out / 'esmfold.pt'})")
    model, cfg = load_trained_model(args.run, args.checkpoint, overrides=args.set,
                                        allow_other_base=args.allow_other_base)
    written = export_esmfold_checkpoint(model, cfg, args.out, esm_type=args.esm_type, lm_out=args.lm_out)
    lm = written["lm_out"] or cfg.model.lm.path or cfg.model.lm.name
    merged = " and ".join(written["adapters_merged"]) or "no"
    print(f"wrote {written['path']} (fair-esm ESMFold, esm_type {written['esm_type']}; {merged} adapter merged)"
          + (f" and the language model {written['lm_out']}" if written["lm_out"] else ""))
    print(f"next: python scripts/predict.py --fasta SEQS.fasta --esmfold {written['path']} --lm {lm} --out PRED_DIR"
          f"   or   python scripts/train_fold.py ... --set model.init_from={written['path']} --set model.lm.path={lm}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
