#!/usr/bin/env python
"""Label sentences with a trained classification run, or answer prompts with an instruction-tuned one.

Classification runs (rt-polarity, rt-score, corr2cause, the GLUE tasks) read --tsv: one sentence a
line, or two tab-separated sentences a line for the sentence-pair tasks (corr2cause, mrpc, stsb,
qqp, mnli, qnli, rte); blank lines are skipped, fields are not quoted, and a first line that reads
`sentence` (pairs: `sentence1<TAB>sentence2`; any case) is a header and skipped. --out is a TSV with a header:
the input column(s), `label` (the class name, from the run's head_config.json; for regression, the
score) and `probability` (of that class). Language-model runs (alpaca, dpo) read --jsonl: one JSON
object a line, {"instruction": ..., "input": ...} or {"prompt": ...} (an optional "system" too), and
--out gets the same records with a "response" each: greedy, at most --max-new-tokens tokens, the
prompt written with the run's chat template (or the Alpaca template). Inputs go through the network
--batch-size at a time (prompts left-padded, one generate call per batch); a line that cannot be
used stops the run with one line naming the file and the line. --no-adapter runs the base model
instead (a classification run keeps its trained head), for comparison.

Examples:
  python scripts/predict_nlp.py --run runs/nlp-rt-polarity-lorta-r4 --tsv sentences.tsv --out labels.tsv
  python scripts/predict_nlp.py --run runs/nlp-rt-polarity-lorta-r4 --tsv sentences.tsv --out base.tsv --no-adapter
  python scripts/predict_nlp.py --run runs/nlp-alpaca-lorta-r4 --jsonl prompts.jsonl --out answers.jsonl \\
      --max-new-tokens 128 --batch-size 8 --device cuda
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.runtime.cli import add_set_argument, exit_code_table, positive_int, run_main
from esmfold_peft.runtime.errors import EXIT_OK, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].rstrip() + "\n\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                   help="the training run directory (written by scripts/train_nlp.py)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--tsv", type=Path, metavar="FILE",
                        help="classification runs: sentences to label, one (or a tab-separated pair) a line")
    inputs.add_argument("--jsonl", type=Path, metavar="FILE",
                        help="alpaca and dpo runs: prompts to answer, one JSON object a line")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the TSV (for --tsv) or JSON lines (for --jsonl) to write; replaced atomically if it exists")
    p.add_argument("--batch-size", type=positive_int, default=16, help="inputs per forward or generate call "
                                                                        "(default 16)")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="--jsonl: the longest answer, in tokens (default: the run's eval.max_new_tokens)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--no-adapter", action="store_true",
                   help="run the base model without the run's adapter (or full fine-tuning), for comparison; a "
                        "classification run keeps its trained head")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load the adapter even if the base model's weights are not those it was made for "
                        "(same architecture)")
    add_set_argument(p, "model.name=/models/roberta-base (a base checkpoint folder that moved)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (nor, when stderr is not a terminal, progress lines)")
    return p


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from esmfold_peft.nlp import infer
    from esmfold_peft.runtime.session import resolve_device

    cfg = infer.run_config(args.run, args.set)
    lm = cfg.task in infer.LM_TASKS
    if lm != (args.jsonl is not None):
        raise UserError(f"{args.run} was trained on {cfg.task} ({'a language model' if lm else 'a classifier'}): give "
                        + ("--jsonl PROMPTS.jsonl, not --tsv" if lm else "--tsv SENTENCES.tsv, not --jsonl"))
    if args.out.is_dir():
        raise UserError(f"{args.out}: is a folder; give the file to write")
    device = resolve_device(args.device)
    if lm:  # the inputs are read (and refused) before the network is built
        records = infer.read_prompts(args.jsonl)
    else:
        rows = infer.read_sentences(args.tsv, infer.columns_of(cfg))
    loaded = infer.load_run(args.run, adapter=not args.no_adapter, allow_other_base=args.allow_other_base,
                            device=device, overrides=args.set)
    method = cfg.adapter.method
    which = "the base model, without the run's training" if args.no_adapter else {
        "full": "its fully fine-tuned weights", "none": "its trained head"}.get(method, f"its {method} adapter")
    if lm:
        answers = infer.generate(loaded, records, args.max_new_tokens or cfg.eval.max_new_tokens, args.batch_size,
                                 progress=not args.no_progress)
        infer.write_responses(args.out, records, answers)
        print(f"wrote {args.out}: {plural(len(records), 'answer')} by {args.run} ({which})")
    else:
        results = infer.classify(loaded, rows, args.batch_size, progress=not args.no_progress)
        infer.write_labels(args.out, rows, results, infer.columns_of(cfg))
        print(f"wrote {args.out}: {plural(len(rows), 'pair' if infer.columns_of(cfg) == 2 else 'sentence')} "
              f"labelled by {args.run} ({which})")
    print_next_step(args, lm)
    return EXIT_OK


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def print_next_step(args, lm: bool) -> None:
    again = f"python scripts/predict_nlp.py --run {args.run} --{'jsonl' if lm else 'tsv'} {args.jsonl or args.tsv}"
    if args.no_adapter:
        compare = f"{again} --out {args.out.with_name('adapted_' + args.out.name)}   (with the run's training)"
    else:
        compare = f"{again} --out {args.out.with_name('base_' + args.out.name)} --no-adapter   (the base model)"
    print(f"next: {compare}   or   python scripts/export_nlp.py --run {args.run} --out HF_DIR   "
          "(a Hugging Face folder)")


if __name__ == "__main__":
    sys.exit(main())
