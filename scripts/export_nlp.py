#!/usr/bin/env python
"""Write a trained NLP run as a plain Hugging Face model folder: the adapter merged into the base weights.

The run's network is rebuilt from its config.json, its adapter loaded from RUN/adapter (with the
classification head saved beside it), merged into the base weights and removed; a head-only run
(adapter none) gets its trained head, a fully fine-tuned run its weights from RUN/model. The folder
(config.json, model.safetensors, tokenizer files) needs no esmfold-peft: transformers'
AutoModelForSequenceClassification (classification, the head included, the label names in the
config) or AutoModelForCausalLM (alpaca, dpo) loads it with the run's outputs. It is written into a
temporary folder beside --out and renamed at the end, so a failure leaves no partial folder.

Examples:
  python scripts/export_nlp.py --run runs/nlp-rt-polarity-lorta-r4 --out rt-lorta-hf
  python scripts/export_nlp.py --run runs/nlp-alpaca-lora-r8 --out smollm2-alpaca-lora --overwrite
  python scripts/export_nlp.py --run runs/rte-lora --out rte-hf --set model.name=/models/roberta-base \\
      --allow-other-base   # the base checkpoint moved, and its weights are not quite the run's
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.runtime.cli import (add_allow_other_base_argument, add_set_argument, exit_code_table, run_main)
from esmfold_peft.runtime.errors import EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].rstrip() + "\n\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                   help="the training run directory (written by scripts/train_nlp.py)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the Hugging Face folder to write (new, or an empty folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    add_allow_other_base_argument(p, "the run's adapter")
    add_set_argument(p, "model.name=/models/roberta-base (a base checkpoint folder that moved)")
    return p


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from esmfold_peft.nlp.infer import check_output_folder, export_hf, load_run

    check_output_folder(args.out, args.overwrite)  # before the run is loaded; export_hf checks again
    loaded = load_run(args.run, allow_other_base=args.allow_other_base, overrides=args.set)
    method = loaded.cfg.adapter.method
    what = {"full": "fully fine-tuned weights", "none": "base weights with its trained classification head"}.get(
        method, f"{method} adapter merged into the base weights" + ("" if loaded.is_lm else ", its head included"))
    model_class = "AutoModelForCausalLM" if loaded.is_lm else "AutoModelForSequenceClassification"
    out = export_hf(loaded, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (a Hugging Face {type(loaded.net.model).__name__} folder: the run's {what})")
    print(f"next: {model_class}.from_pretrained({str(out)!r}) with transformers   (or with the run itself: "
          f"python scripts/predict_nlp.py --run {args.run} "
          + ("--jsonl PROMPTS.jsonl --out answers.jsonl)" if loaded.is_lm else "--tsv SENTENCES.tsv --out labels.tsv)"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
