"""Run every benchmark on this machine, keep their JSON, and rewrite BENCHMARKS.md from it (`make bench`).

Each script runs in a fresh process (so one's memory or thread state cannot touch the next) and
writes `bench/results/<machine>/<name>.json`; this script adds `run.json` (command, wall times,
load averages) and renders BENCHMARKS.md from everything under `bench/results/` (bench/report.py).

    python bench/run_all.py                 # all benchmarks, the device's default shapes
    python bench/run_all.py --smoke --results-root /tmp/b   # tiny shapes, seconds; BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, ROOT, load_average, machine_tag, pick_device, write_json
from report import load_runs, render, render_machine

SCRIPTS = (  # (script, extra arguments)
    ("adapter_step.py", ()),
    ("adapter_profile.py", ("--profile",)),
    ("merged_inference.py", ()),
    ("fold_step.py", ()),
    ("predict_throughput.py", ()),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks that everything runs")
    p.add_argument("--results-root", default=str(BENCH_DIR / "results"))
    p.add_argument("--markdown", default="", help="default: BENCHMARKS.md (smoke: <results-root>/BENCHMARKS.md)")
    p.add_argument("--only", default="", help="comma-separated script names (without .py) to run")
    args = p.parse_args()
    device = pick_device(args.device)
    tag = machine_tag(device) + ("-smoke" if args.smoke else "")
    root = Path(args.results_root)
    folder = root / tag
    markdown = Path(args.markdown) if args.markdown else (root if args.smoke else ROOT) / "BENCHMARKS.md"
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    started, load_before = time.time(), load_average()
    print(f"machine {tag}; load average before: {load_before}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = []
    for script, extra in SCRIPTS:
        name = script[:-3]
        if only and name not in only:
            continue
        out = folder / f"{name}.json"
        out = os.path.relpath(out, ROOT) if out.resolve().is_relative_to(ROOT) else str(out)
        cmd = [sys.executable, os.path.relpath(BENCH_DIR / script, ROOT), "--device", device.type, "--out", out,
               *extra, *(["--smoke"] if args.smoke else [])]
        print(f"\n=== {script} ===", flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        done.append({"script": script, "returncode": rc, "wall_time_s": round(time.time() - t0, 1)})
        if rc != 0:
            print(f"{script} failed with exit status {rc}", flush=True)
    run = {"command": "make bench" if not args.smoke and not only and Path(sys.argv[0]).name == "run_all.py"
           and os.environ.get("MAKELEVEL") else " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
           "wall_time_s": round(time.time() - started, 1), "load_average_before": load_before,
           "load_average_after": load_average(), "benchmarks": done}
    write_json(folder / "run.json", run)
    runs = load_runs(root, include_smoke=args.smoke)
    if args.smoke:
        runs = {k: v for k, v in runs.items() if k == tag}
    markdown.write_text(render(runs))
    print(f"\nwrote {folder}/ and {markdown}; total {run['wall_time_s'] / 60:.1f} min, load average after "
          f"{run['load_average_after']}")
    if tag in runs:  # the targets table of this run, last
        section = render_machine(tag, runs[tag]["run"], runs[tag]["data"])
        start = section.find("**Targets**")
        if start >= 0:
            print("\n" + section[start:section.find("\n\n###", start)].strip())
    if any(b["returncode"] != 0 for b in done):
        sys.exit(1)


if __name__ == "__main__":
    main()
