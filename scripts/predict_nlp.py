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

Many adapters over one model: --run may be given several times (lorta runs, or lora runs, over the
same base; --run NAME=DIR names one, else its folder's name is its adapter's name). Each input row
picks its adapter: a TSV whose header ends with a column `adapter` (`sentence<TAB>adapter`), a JSON
line with a key "adapter"; a name, or `base` for the base model (a classification row then takes the
first run's head). --adapter NAME|base is the default for rows that name none (with one run: that
run's adapter). The rows of a batch may use different adapters: the base network runs once per
batch, each row with its own adapter (and its own run's head), as its run alone would. --out then
gets an `adapter` column (a key "adapter") with the adapter each row used.

Examples:
  python scripts/predict_nlp.py --run runs/nlp-rt-polarity-lorta-r4 --tsv sentences.tsv --out labels.tsv
  python scripts/predict_nlp.py --run runs/nlp-rt-polarity-lorta-r4 --tsv sentences.tsv --out base.tsv --no-adapter
  python scripts/predict_nlp.py --run runs/nlp-alpaca-lorta-r4 --jsonl prompts.jsonl --out answers.jsonl \\
      --max-new-tokens 128 --batch-size 8 --device cuda
  python scripts/predict_nlp.py --run runs/rt-lorta-r4 --run runs/rt-lorta-r8 --tsv with_adapters.tsv \\
      --adapter rt-lorta-r4 --out labels.tsv
"""

import argparse
import logging
import sys
from pathlib import Path

from esmfold_peft.runtime.cli import (add_allow_other_base_argument, add_set_argument, exit_code_table, positive_int,
                                      run_main)
from esmfold_peft.runtime.errors import EXIT_OK, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].rstrip() + "\n\n" + exit_code_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]RUN_DIR",
                   help="the training run directory (written by scripts/train_nlp.py); several: their adapters "
                        "over one base network, each named NAME (default: the folder's name)")
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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-adapter", action="store_true",
                       help="run the base model without the run's adapter (or full fine-tuning), for comparison; a "
                            "classification run keeps its trained head")
    which.add_argument("--adapter", metavar="NAME|base",
                       help="the adapter of the rows that name none (an `adapter` column or key); default: the run's "
                            "when one run is given")
    add_allow_other_base_argument(p, "the runs' adapters")
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

    given, args.run = zip(*(run_spec(r) for r in args.run))
    cfgs = [infer.run_config(run, args.set) for run in args.run]
    cfg = cfgs[0]
    lm = cfg.task in infer.LM_TASKS
    for run, c in zip(args.run, cfgs):
        kind = c.task in infer.LM_TASKS
        if kind != (args.jsonl is not None):
            raise UserError(f"{run} was trained on {c.task} ({'a language model' if kind else 'a classifier'}): give "
                            + ("--jsonl PROMPTS.jsonl, not --tsv" if kind else "--tsv SENTENCES.tsv, not --jsonl"))
    if args.out.is_dir():
        raise UserError(f"{args.out}: is a folder; give the file to write")
    device = resolve_device(args.device)
    # the inputs are read (and refused) before the network is built
    inputs = infer.read_prompt_file(args.jsonl) if lm else infer.read_sentence_file(args.tsv, infer.columns_of(cfg))
    if len(args.run) > 1 or inputs.named or args.adapter is not None:
        return predict_mixed(args, infer, inputs, list(given), cfg, lm, device)
    args.run = args.run[0]
    loaded = infer.load_run(args.run, adapter=not args.no_adapter, allow_other_base=args.allow_other_base,
                            device=device, overrides=args.set)
    method = cfg.adapter.method
    which = "the base model, without the run's training" if args.no_adapter else {
        "full": "its fully fine-tuned weights", "none": "its trained head"}.get(method, f"its {method} adapter")
    write_results(args, infer, loaded, inputs.rows, cfg, lm, None, f"by {args.run} ({which})")
    print_next_step(args, lm)
    return EXIT_OK


def run_spec(text: str):
    """(name or None, folder) of a --run value: NAME=DIR, or DIR (an existing DIR with a '=' stays a DIR)."""
    name, sep, folder = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(folder)
    return None, Path(text)


def predict_mixed(args, infer, inputs, given, cfg, lm: bool, device) -> int:
    """Each row with the adapter it names (or --adapter's), the runs' adapters over one network."""
    if args.no_adapter:
        raise UserError("--no-adapter runs one run's base model for every row: it takes one run and no adapter "
                        f"column; with several runs or an adapter column, --adapter {infer.BASE} is the default for "
                        "rows that name none")
    names = infer.run_names(args.run, given)
    default = args.adapter if args.adapter is not None else names[0] if len(names) == 1 else None
    if default is not None and default != infer.BASE and default not in names:
        raise UserError(f"--adapter {default}: no such adapter; known: {', '.join(names)}, {infer.BASE} "
                        "(the base model)")
    source = args.jsonl or args.tsv
    adapters = row_adapters(source, inputs, names, default)
    used = set(adapters)
    if len(names) == 1 and len(used) == 1:  # one run, one choice for every row: as the run alone
        loaded = infer.load_run(args.run[0], adapter=used != {None}, allow_other_base=args.allow_other_base,
                                device=device, overrides=args.set)
        adapters_arg = None
    else:
        loaded = infer.load_runs(args.run, names, allow_other_base=args.allow_other_base, device=device,
                                 overrides=args.set)
        adapters_arg = adapters
    counts = ", ".join(f"{n or infer.BASE} {adapters.count(n)}" for n in [*names, None] if n in used)
    shown = [n or infer.BASE for n in adapters]
    write_results(args, infer, loaded, inputs.rows, cfg, lm, (adapters_arg, shown),
                  f"over one network (rows per adapter: {counts})")
    print("next: python scripts/export_nlp.py --run RUN --out HF_DIR   (one run as a Hugging Face folder)")
    return EXIT_OK


def row_adapters(path: Path, inputs, names, default):
    """Per row: the adapter it names, else `default`; None for the base model. One line for a name that is
    not known, or a row that names none when there is no default."""
    from esmfold_peft.nlp.infer import BASE

    out = []
    for name, line in zip(inputs.adapters, inputs.lines):
        name = name if name is not None else default
        if name is None:
            raise UserError(f"{path}: line {line}: names no adapter, and with several runs there is no default: "
                            f"give --adapter NAME ({', '.join(names)}) or --adapter {BASE}")
        if name != BASE and name not in names:
            raise UserError(f"{path}: line {line}: no adapter named {name!r}; known: {', '.join(names)}, {BASE} "
                            "(the base model)")
        out.append(None if name == BASE else name)
    return out


def write_results(args, infer, loaded, rows, cfg, lm: bool, adapters, how: str) -> None:
    """Predict and write --out; `adapters`: (the names to route by, or None; the names to write), or None."""
    route, shown = adapters if adapters is not None else (None, None)
    if lm:
        answers = infer.generate(loaded, rows, args.max_new_tokens or cfg.eval.max_new_tokens, args.batch_size,
                                 progress=not args.no_progress, adapters=route)
        records = rows if shown is None else [{**r, infer.ADAPTER_KEY: n} for r, n in zip(rows, shown)]
        infer.write_responses(args.out, records, answers)
        print(f"wrote {args.out}: {plural(len(rows), 'answer')} {how}")
    else:
        results = infer.classify(loaded, rows, args.batch_size, progress=not args.no_progress, adapters=route)
        infer.write_labels(args.out, rows, results, infer.columns_of(cfg), shown)
        print(f"wrote {args.out}: {plural(len(rows), 'pair' if infer.columns_of(cfg) == 2 else 'sentence')} "
              f"labelled {how}")


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
