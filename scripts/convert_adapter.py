#!/usr/bin/env python
"""Convert a LoRA adapter between esmfold-peft's folder format and Hugging Face PEFT's.

--to peft writes a folder that `PeftModel.from_pretrained(base, OUT)` loads with the same outputs
(a classification head saved beside the adapter goes in as PEFT's modules_to_save); --to native
reads a PEFT LoRA folder into esmfold-peft's format. The base model (a Hugging Face checkpoint
folder) gives the module paths, and the adapter must have been made for it (its recorded
fingerprint; --allow-other-base loads it onto other weights of the same architecture anyway). The
converted folder keeps the base record of the adapter it came from. LoRTA has no PEFT type: it
stays in esmfold-peft's format.

Examples:
  python scripts/convert_adapter.py --to peft --adapter runs/rte-lora/adapter --out rte-peft --base models/roberta
  python scripts/convert_adapter.py --to native --adapter rte-peft --out rte-native --base models/roberta
  python scripts/convert_adapter.py --to peft --adapter runs/rte-lora/adapter --out rte-peft \\
      --base models/roberta-finetuned --allow-other-base
"""

import argparse
import sys
from pathlib import Path

from esmfold_peft.adapters import is_peft_folder, load_adapter, read_adapter_config, save_adapter
from esmfold_peft.adapters.io import saved_base, saved_head_names
from esmfold_peft.runtime.cli import add_allow_other_base_argument, exit_code_table, run_main
from esmfold_peft.runtime.errors import EXIT_OK, OutputPathError, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join([__doc__.split("\n\n", 2)[2].rstrip(), exit_code_table()]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", choices=("peft", "native"), required=True,
                   help="the format to write: peft (Hugging Face PEFT's LoRA folder) or native (esmfold-peft's)")
    p.add_argument("--adapter", type=Path, required=True, metavar="DIR",
                   help="the adapter folder to convert (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the folder to write (new, or empty)")
    p.add_argument("--base", type=Path, required=True, metavar="MODEL_DIR",
                   help="the Hugging Face checkpoint folder the adapter was made for (config.json + weights)")
    add_allow_other_base_argument(p, "the adapter", "; the converted folder keeps the adapter's recorded base")
    return p


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source_is_peft = is_peft_folder(args.adapter)  # a folder without a config is refused here, in one line
    if source_is_peft == (args.to == "peft"):
        raise UserError(f"{args.adapter}: already in {'PEFT' if source_is_peft else 'esmfold-peft'}'s format")
    if not source_is_peft:
        kind = read_adapter_config(args.adapter)["method"]
        if kind != "lora":
            raise UserError(f"{args.adapter}: a {kind} adapter has no PEFT type (PEFT has LoRA, not LoRTA); it stays "
                            "in esmfold-peft's format: load it with esmfold_peft.adapters.load_adapter(model, DIR)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise OutputPathError(f"{args.out}: exists and is not an empty folder; give a new --out")
    model, auto = load_base(args.base)
    load_adapter(model, args.adapter, allow_other_base=args.allow_other_base)
    try:
        save_adapter(model, args.out, format=args.to, head=saved_head_names(args.adapter),
                     base_name=str(args.base), base=saved_base(args.adapter))
    except ValueError as exc:  # a layout PEFT cannot hold (fused q/k/v)
        raise UserError(f"{args.adapter}: {exc}") from None
    print(f"wrote {args.out} ({'PEFT LoRA' if args.to == 'peft' else 'esmfold-peft'} format)")
    if args.to == "peft":
        print(f"next: PeftModel.from_pretrained({auto}.from_pretrained('{args.base}'), '{args.out}')   (peft)")
    else:
        print(f"next: esmfold_peft.adapters.load_adapter(model, '{args.out}')   (model: {auto} of {args.base})")
    return EXIT_OK


def load_base(folder: Path):
    """(model, its transformers class name) of a Hugging Face checkpoint folder, float32, in eval mode."""
    import torch
    import transformers

    from esmfold_peft.nlp.sources import quiet_transformers
    from esmfold_peft.runtime.artifacts import read_json

    config = read_json(folder / "config.json", dict, "model config")  # a missing or damaged file: one line
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise UserError(f"{folder / 'config.json'}: names no transformers model class in 'architectures' "
                        f"({names or 'none'})")
    try:
        with quiet_transformers():
            model = cls.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: cannot load the base model ({str(exc).splitlines()[0]})") from None
    return model.eval(), names[0]


if __name__ == "__main__":
    sys.exit(main())
