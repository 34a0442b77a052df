#!/usr/bin/env python
"""Stress the end of multi-process jobs: 2-process gloo training and prediction under torchrun, many times.

Not part of the test suite (it takes minutes); run it after touching distributed set-up or teardown:

    .venv/bin/python tests/stress_ddp.py --launches 30          # 30 trainings + 30 predictions
    .venv/bin/python tests/stress_ddp.py --launches 30 --load 1  # the same beside 1 busy process

Each launch is `torchrun --standalone --nproc_per_node 2` of scripts/train_fold.py (a tiny run of 3 steps,
gloo) or scripts/predict.py (a tiny run's model on 6 records). A launch is abnormal when torchrun exits
with anything but 0 or a process printed an abort ("terminate called", a signal, a traceback). Prints one
line per abnormal launch and a summary; exits 1 when any launch was abnormal.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fold_fixtures import write_tiny_config_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ABORTS = ("terminate called", "Aborted", "SIGABRT", "Signal 6", "exitcode  : -", "Traceback")


def busy(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def launch(cmd: list[str], env: dict) -> tuple[int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=30, help="launches of each kind (default 30)")
    p.add_argument("--kinds", default="train,predict", help="train, predict or both (default)")
    p.add_argument("--load", type=int, default=0, help="busy processes beside the launches (default 0)")
    args = p.parse_args()
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="stress_ddp_"))
    config = write_tiny_config_file(tmp, steps=3)
    train = [str(ROOT / "scripts" / "train_fold.py"), "--config", str(config), "--no-progress",
             "--set", "train.effective_batch_size=4"]
    run = tmp / "model_run"
    code, out = launch([sys.executable] + train + ["--out", str(run)], env)
    if code:
        print(out[-3000:])
        return 1
    fasta = tmp / "records.fasta"
    fasta.write_text("".join(f">r{i}\n{'MKTAYIAKQRQISFVKSHFSRQ'[:10 + 2 * i]}\n" for i in range(6)))
    predict = [str(ROOT / "scripts" / "predict.py"), "--fasta", str(fasta), "--run-dir", str(run), "--quiet"]
    workers = [multiprocessing.Process(target=busy, args=(time.time() + 3600,), daemon=True)
               for _ in range(args.load)]
    for w in workers:
        w.start()
    results = {}
    started = time.time()
    try:
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            bad = 0
            for i in range(args.launches):
                cmd = LAUNCHER + (train + ["--out", str(tmp / f"train_{i}")] if kind == "train"
                                  else predict + ["--out", str(tmp / f"pred_{i}")])
                code, out = launch(cmd, env)
                faults = [a for a in ABORTS if a in out]
                if code or faults:
                    bad += 1
                    print(f"{kind} launch {i + 1}: exit {code}, {', '.join(faults) or 'no abort printed'}")
                    print("    " + "\n    ".join(out.strip().splitlines()[-12:]))
            results[kind] = bad
            print(f"{kind}: {bad} abnormal of {args.launches} launches", flush=True)
    finally:
        for w in workers:
            w.terminate()
    total = sum(results.values())
    print(f"{total} abnormal exits in {args.launches * len(results)} launches ({time.time() - started:.0f} s; "
          f"{args.load} busy process(es) beside them; files in {tmp})")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
