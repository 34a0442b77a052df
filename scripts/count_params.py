#!/usr/bin/env python
"""Count an adapter's trainable parameters for a named architecture, without downloading weights.

The count comes from an adapter module instantiated on the architecture's attention layout (on the
meta device: no memory is used); the closed-form count is printed beside it as a cross-check.
A table by default; --json prints one JSON object instead (for scripts).

Examples:
  python scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8
  python scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8 --json   # {"params": 4320, ...}
  python scripts/count_params.py --layers 24 --d-model 1024 --heads 16 --adapter lorta --rank 8
  python scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8 --modes heads,matrices
  python scripts/count_params.py --arch llama3-8b --adapter lora --rank 8 --targets q,v
  python scripts/count_params.py --arch esmfold_3B_v1_seq --adapter lorta --rank 8   # ESMFold trunk,
  python scripts/count_params.py --arch esmfold_3B_v1_tri --adapter lorta --rank 8   # one tensor per family
"""

import argparse
import json
import sys
import textwrap

from esmfold_peft.adapters import (ARCHITECTURES, METHODS, AdapterConfigError, AttentionLayout,
                                   LayoutError, architecture, build_adapter, config_from_dict, parse_modes)
from esmfold_peft.runtime.cli import exit_code_table, positive_float, positive_int, run_main
from esmfold_peft.runtime.errors import EXIT_OK, UserError


def build_parser() -> argparse.ArgumentParser:
    known = textwrap.fill("Known architectures: " + ", ".join(sorted(ARCHITECTURES)) + ".", width=100)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join([__doc__.split("\n\n", 2)[2].rstrip(), known, exit_code_table()]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("architecture (a name, or its shape)")
    g.add_argument("--arch", metavar="NAME",
                   help="a known architecture (listed below), e.g. esm2_t12_35M, roberta-base, llama2-7b")
    g.add_argument("--layers", type=positive_int, metavar="L", help="number of layers L (with --d-model, --heads)")
    g.add_argument("--d-model", type=positive_int, metavar="D", help="model width d")
    g.add_argument("--heads", type=positive_int, metavar="H", help="attention heads H")
    g.add_argument("--kv-heads", type=positive_int, metavar="H_KV",
                   help="key/value heads (grouped-query attention); default H")
    g.add_argument("--head-dim", type=positive_int, metavar="D_H", help="head width d_H; default d/H")
    p.add_argument("--adapter", choices=METHODS, required=True, help="the adapter to count: lorta or lora")
    p.add_argument("--rank", type=positive_int, required=True, metavar="R", help="adapter rank r")
    p.add_argument("--alpha", type=positive_float, default=None, metavar="A",
                   help="scale numerator, alpha / r (recorded; does not change the count; default: r)")
    p.add_argument("--modes", default=None,
                   help="LoRTA tensor modes: a comma-separated subset of heads,matrices,layers, or all "
                        "(the default); LoRTA only")
    p.add_argument("--targets", default="q,k,v,o",
                   help="the adapted projections, a comma-separated subset of q,k,v,o (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (params, formula, the layout, ...) "
                                                       "instead of the table")
    return p


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = count(args)
    except (LayoutError, AdapterConfigError) as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(record) if args.json else table(record))
    return EXIT_OK


def layout_of(args) -> AttentionLayout:
    if args.arch:
        return architecture(args.arch)
    if args.layers and args.d_model and args.heads:
        return AttentionLayout("custom", args.layers, args.d_model, args.heads,
                               args.head_dim or args.d_model // args.heads, args.kv_heads)
    raise UserError("give --arch NAME, or --layers, --d-model and --heads")


def count(args) -> dict:
    """The record --json prints: the instantiated count, the closed form, the settings and the layout."""
    layout = layout_of(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    settings = {"method": args.adapter, "rank": args.rank, "alpha": args.alpha, "targets": targets}
    if args.modes is not None:
        if args.adapter != "lorta":
            raise UserError(f"--modes applies to --adapter lorta only, not {args.adapter}")
        settings["modes"] = parse_modes(args.modes)
    config = config_from_dict(settings)
    adapter = build_adapter(config, layout, device="meta")
    n = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    record = {"params": n, "formula": type(adapter).formula_num_parameters(config, layout),
              "arch": args.arch or "custom", "adapter": args.adapter, "rank": config.rank, "alpha": config.alpha,
              "targets": list(config.targets), **layout.describe()}
    if args.adapter == "lorta":
        record["modes"] = list(config.modes)
    return record


def table(record: dict) -> str:
    """The record as aligned `name  value` lines."""
    r = record
    kv = f" ({r['n_kv_heads']} key/value)" if r["n_kv_heads"] != r["n_heads"] else ""
    rows = [("architecture", f"{r['arch']} ({r['family']})"),
            ("layers", f"{r['n_layers']}"),
            ("width d", f"{r['d_model']}"),
            ("heads", f"{r['n_heads']}{kv}, head width {r['head_dim']}"),
            ("adapter", f"{r['adapter']}, rank {r['rank']}, alpha {r['alpha']:g} (scale {r['alpha'] / r['rank']:g})"),
            ("targets", ",".join(r["targets"]))]
    if "modes" in r:
        rows.append(("tensor modes", ",".join(r["modes"])))
    check = "agrees" if r["params"] == r["formula"] else "DIFFERS"
    rows.append(("trainable parameters", f"{r['params']:,}"))
    rows.append(("closed form", f"{r['formula']:,} ({check})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
