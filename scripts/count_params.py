#!/usr/bin/env python
"""Count an adapter's trainable parameters for a named architecture, without downloading weights.

The count comes from an adapter module instantiated on the architecture's attention layout (on the
meta device: no memory is used); the closed-form count is printed beside it as a cross-check.

    python scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8
    {"params": 4320, "formula": 4320, ...}
    python scripts/count_params.py --layers 24 --d-model 1024 --heads 16 --adapter lorta --rank 8
    python scripts/count_params.py --arch esm2_t12_35M --adapter lorta --rank 8 --modes heads,matrices
    python scripts/count_params.py --arch esmfold_3B_v1_seq --adapter lorta --rank 8   # ESMFold trunk,
    python scripts/count_params.py --arch esmfold_3B_v1_tri --adapter lorta --rank 8   # one tensor per family
"""

import argparse
import json
import sys


from esmfold_peft.adapters import (ARCHITECTURES, METHODS, AdapterConfigError, AttentionLayout,
                                   LayoutError, architecture, build_adapter, config_from_dict, parse_modes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="known architectures: " + ", ".join(sorted(ARCHITECTURES)))
    g = p.add_argument_group("architecture (a name, or its shape)")
    g.add_argument("--arch", help="architecture name, e.g. esm2_t12_35M, roberta-base, llama2-7b")
    g.add_argument("--layers", type=int, help="number of layers L")
    g.add_argument("--d-model", type=int, help="model width d")
    g.add_argument("--heads", type=int, help="attention heads H")
    g.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention); default H")
    g.add_argument("--head-dim", type=int, help="head width d_H; default d/H")
    p.add_argument("--adapter", choices=METHODS, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, default=None, help="scale numerator (does not change the count)")
    p.add_argument("--modes", default=None,
                   help="LoRTA tensor modes: a comma-separated subset of heads,matrices,layers, or all "
                        "(the default)")
    p.add_argument("--targets", default="q,k,v,o", help="comma-separated subset of q,k,v,o")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return count(args)
    except (LayoutError, AdapterConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def count(args) -> int:
    if args.arch:
        layout = architecture(args.arch)
    elif args.layers and args.d_model and args.heads:
        layout = AttentionLayout("custom", args.layers, args.d_model, args.heads,
                                 args.head_dim or args.d_model // args.heads, args.kv_heads)
    else:
        print("error: give --arch NAME, or --layers, --d-model and --heads", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    settings = {"method": args.adapter, "rank": args.rank, "alpha": args.alpha, "targets": targets}
    if args.modes is not None:
        if args.adapter != "lorta":
            print(f"error: --modes applies to --adapter lorta only, not {args.adapter}", file=sys.stderr)
            return 2
        settings["modes"] = parse_modes(args.modes)
    config = config_from_dict(settings)
    adapter = build_adapter(config, layout, device="meta")
    n = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    record = {"params": n, "formula": type(adapter).formula_num_parameters(config, layout),
              "arch": args.arch or "custom", "adapter": args.adapter, "rank": config.rank, "alpha": config.alpha,
              "targets": list(config.targets), **layout.describe()}
    if args.adapter == "lorta":
        record["modes"] = list(config.modes)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
