"""Benchmark: routing records to adapters (`predict.py --adapter-library --adapter auto`) on the fine-tuning demo.

Runs (or continues) `scripts/demo_finetune.py --new-family clade`: base families and a new family that is a
clade (variants of one ancestor, which is the first base parent with 60% of its residues substituted), a
base ESMFold trained here and exported, LoRTA fine-tuned on the new family, and the held-out variants of
both predicted by (1) the base file alone, (2) the fine-tuned run, its adapter merged, for everything, and
(3) the base file serving a library whose one entry is the fine-tuned adapter, every record routed with
`--adapter auto` (k-mer containment against the adapter's training sequences, threshold 0.1). This
script copies the demonstration's numbers into its JSON: where `auto` sent each family's variants
(routing accuracy: the new family's to the adapter, the base families' to the base) and LDDT-Cα under the
three. The demonstration's stages are resumable; a finished one is read, not rerun.

    python bench/routing_demo.py                       # 1,617 s measured on 2 CPU cores (the demo's training)
    python bench/routing_demo.py --demo-out runs/demo-routing --threads 1
    python bench/routing_demo.py --smoke               # the demonstration's tiniest shapes (seconds)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from common import ROOT, base_parser, finish, load_average, pick_device
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.text import format_score

MODELS = {"base": "base file alone", "finetuned": "adapter merged, for everything", "routed": "auto-routed"}


def routing_rows(results: dict) -> list:
    by = {(s["model"], s["family"]): s for s in results["scores"]}
    rows = []
    for family, label in (("new", "new family (a clade)"), ("base", "base families")):
        r = results["routing"][family]
        rows.append([label, r["n"], r["to_adapter"], r["to_base"], f"{r['accuracy']:.0%}",
                     *(format_score(by[(m, family)]["lddt_ca"], 3, missing="–") for m in MODELS)])
    return rows


def tables(results: dict) -> list:
    return [{"title": "Routing on the fine-tuning demonstration (new family: a clade), held-out variants",
             "columns": ["held-out variants of", "chains", "routed to the adapter", "to the base", "routing accuracy",
                         *(f"LDDT-Cα, {label}" for label in MODELS.values())],
             "rows": routing_rows(results),
             "notes": [f"scripts/demo_finetune.py --new-family clade ({results['settings']['base_steps']} base steps, "
                       f"{results['settings']['finetune_steps']} fine-tuning steps, LoRTA r="
                       f"{results['settings']['rank']} on the LM and trunk); --adapter auto with threshold "
                       f"{results['routing_threshold']:g}; LDDT-Cα: global pooled per chain, mean over chains; the "
                       f"demonstration took {results['total_wall_s']:.0f} s wall ({results['total_cpu_s']:.0f} s CPU) "
                       "over all its stages, this script's run only reads it when it is done. "
                       "Synthetic families: the numbers show the mechanism, not what routing does for real "
                       "families."]}]


def read_routing_demo(d: dict) -> tuple[list, str]:
    r = d["results"]
    by = {(s["model"], s["family"]): s["lddt_ca"] for s in r["scores"]}
    routing = r["routing"]
    keep_base = by[("routed", "base")] - by[("base", "base")]
    keep_new = by[("routed", "new")] - by[("finetuned", "new")]
    targets = [["auto-routed LDDT-Cα − base alone's, base families", "≥ −0.01", f"{keep_base:+.3f}",
                "met" if keep_base >= -0.01 else "missed"],
               ["auto-routed LDDT-Cα − the adapter's, new family", "≥ −0.01", f"{keep_new:+.3f}",
                "met" if keep_new >= -0.01 else "missed"]]
    reading = (f"Goal: auto keeps the base families at the base's accuracy and the new family at the adapter's. "
               f"Base families: base alone {by[('base', 'base')]:.3f}, adapter for everything "
               f"{by[('finetuned', 'base')]:.3f}, auto {by[('routed', 'base')]:.3f}. New family: base alone "
               f"{by[('base', 'new')]:.3f}, adapter {by[('finetuned', 'new')]:.3f}, auto {by[('routed', 'new')]:.3f}. "
               f"Routing accuracy {routing['new']['accuracy']:.0%} on {routing['new']['n']} new-family variants and "
               f"{routing['base']['accuracy']:.0%} on {routing['base']['n']} base-family variants. Auto-routed records "
               "run unmerged in mixed batches, the 'for everything' ones with the adapter merged: equal functions, "
               "different float rounding.")
    return targets, reading


REPORT = {"routing_demo": ("12. Routing records to adapters (the fine-tuning demonstration)", read_routing_demo)}


def _main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--demo-out", type=Path, default=None,
                   help="the demonstration's folder (default: runs/demo-routing, runs/demo-routing-smoke with --smoke)")
    args = p.parse_args(argv)
    demo = ROOT / "scripts" / "demo_finetune.py"
    sys.path.insert(0, str(demo.parent))
    import demo_finetune

    out = args.demo_out or Path("runs") / ("demo-routing-smoke" if args.smoke else "demo-routing")
    out = Path(os.path.relpath(ROOT / out if not out.is_absolute() else out, ROOT))  # no machine path in the JSON
    os.chdir(ROOT)
    started, load_before = time.time(), load_average()
    flags = ["--new-family", "clade", "--out", str(out), "--no-progress"] + (["--smoke"] if args.smoke else []) + \
        ([] if args.threads < 0 else ["--threads", str(args.threads)])
    if demo_finetune.main(flags) != 0:
        raise SystemExit(f"the demonstration failed: python scripts/demo_finetune.py {' '.join(flags)}")
    results = json.loads((out / demo_finetune.RESULTS_JSON).read_text())
    finish("routing_demo", args, pick_device("cpu"), started, load_before,
           {"demo": str(out), "demo_command": "python scripts/demo_finetune.py " + " ".join(flags),
            "results": {k: results[k] for k in ("settings", "scores", "routing", "routing_threshold", "data",
                                                "total_wall_s", "total_cpu_s")},
            "tables": tables(results)})
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
