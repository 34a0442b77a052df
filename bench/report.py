"""Write BENCHMARKS.md from the JSON under bench/results/<machine>/: every number in it comes from there.

Each machine's section is rendered from that machine's last `run_all.py` run (its `run.json` and
the benchmarks' JSON); the text around the tables is written here, and where it quotes a number or
says whether a target was met, it reads that from the same JSON.

    python bench/report.py            # re-render without running anything
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

from common import BENCH_DIR, ROOT, markdown_table


HEADER = """# Benchmarks

Does LoRTA cost no more than LoRA to train, and nothing at inference? Measured as ratios, one run per
machine, by the scripts in `bench/`; each prints its tables last and writes JSON to
`bench/results/<machine>/`. These are benchmarks, not timed tests: nothing here fails a build.

**Regenerate:** `make bench` (= `.venv/bin/python bench/run_all.py`) runs sections 1–4, one script
after the other, each in a fresh process, then rewrites this file from the JSON under
`bench/results/`; on a 2-core CPU machine it stays within 15 minutes by using smaller shapes, which
the tables state. Beside it, each writing its own JSON: `make bench-memory` (section 6, about 15
minutes), `make bench-long` (sections 5 and 6b, hours on 2 CPU cores), `make bench-nlp` (sections
8–9; installs `peft` for this benchmark only), `python bench/compile_step.py` (section 10), `make
bench-mixed` (section 11, about 6 minutes), `make bench-routing` (section 12, about 27 minutes for
the fine-tuning demonstration it runs) and `make bench-gpu` (section 7, one H100/H200, then section
11's cells on the GPU). Every section below names the command and run that produced its numbers; the file holds no number those runs did not measure. `python bench/report.py`
re-renders without running.

## How it is measured

* **Interleaving.** Every variant is warmed up, then in each round all variants run once in a fresh
  random order. A variant's time is the median over rounds (min–max in brackets); a ratio is
  computed within each round, between measurements seconds apart, then summarised the same way.
  Noise from other processes therefore hits all variants alike, and its size is visible.
* **Clock.** On CPU the scripts run torch with one thread and time process CPU seconds. On a shared
  machine a 2-thread run waits at every parallel region for both cores, so each op can cost a
  scheduler time slice whenever another process holds one; with one thread the CPU seconds equal wall
  seconds on an idle machine and do not count the time slices other processes take. On GPU: wall
  time between `torch.cuda.synchronize()` calls.
* **Memory.** GPU: `torch.cuda.max_memory_allocated` over one step. CPU has no peak counter, so a
  `TorchDispatchMode` (`bench/common.py`) follows every tensor storage created during one step
  (forward, backward, optimizer) until it is freed. On both, a variant's peak = the bytes it keeps
  between steps (parameters, buffers, its own optimizer state, inputs) + the highest amount allocated
  during the step above what was allocated at its start: live tensor bytes, without allocator caching;
  on CPU it is deterministic. "Above the floor" subtracts the floor's peak: exactly what training
  the adapter adds to running the frozen model.
* **Models.** Random weights (costs do not depend on them). ESM-2 shapes keep the true width and
  heads, which set the per-projection arithmetic; on CPU the 650M and 3B shapes keep only a few of
  their layers and a short batch (said in every table). The folding benchmarks build the model with
  `esmfold_peft.fold.model.build.build_model` from the named config.
"""


# --- the sections: each benchmark script's REPORT ------------------------------------------------------

# the scripts, in the order of their sections; each has REPORT = {its JSON's name: (section title, reading)}
SCRIPTS = ("adapter_step", "adapter_profile", "merged_inference", "fold_step", "predict_throughput",
           "esm_attention", "predict_memory", "gpu_suite", "nlp_adapter_step", "nlp_dpo_reference", "compile_step",
           "mixed_adapters", "routing_demo")


def readers() -> dict:
    """{JSON name: (section title, reading function)} of every benchmark script, in section order."""
    out = {}
    for script in SCRIPTS:
        out.update(importlib.import_module(script).REPORT)
    return out


# --- the file ----------------------------------------------------------------------------------------

def load_runs(results_dir: Path, include_smoke: bool = False) -> dict:
    runs = {}
    if not results_dir.is_dir():
        return runs
    for folder in sorted(p for p in results_dir.iterdir()
                         if p.is_dir() and (include_smoke or not p.name.endswith("-smoke"))):
        data = {name: json.loads((folder / f"{name}.json").read_text())
                for name in readers() if (folder / f"{name}.json").is_file()}
        if data:
            run = folder / "run.json"
            runs[folder.name] = {"run": json.loads(run.read_text()) if run.is_file() else None, "data": data}
    return runs


def render_machine(tag: str, run: dict | None, data: dict) -> str:
    any_d = next(iter(data.values()))
    m = any_d["machine"]
    out = [f"## Machine `{tag}`", ""]
    desc = (f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB), host CPU {m['cpu']}" if m.get("gpu")
            else f"{m['cpu']}, {m['cpu_count']} cores, {m.get('memory_gib')} GiB RAM")
    out.append(f"* **Machine:** {desc}; Python {m['python']}, torch {m['torch']}, {m['torch_threads']} torch "
               f"thread(s), clock: {m.get('clock', 'wall')}; commit `{m['commit']}`.")
    if run:
        out.append(f"* **Command:** `{run['command']}`, started {run['started']}; total wall time "
                   f"{run['wall_time_s'] / 60:.1f} min; load average (1, 5, 15 min) before "
                   f"{run['load_average_before']}, "
                   f"after {run['load_average_after']}.")
        per = [f"`{b['script']}` {b['wall_time_s']:.0f} s"
               + ("" if b["returncode"] == 0 else f" (FAILED, exit {b['returncode']})") for b in run["benchmarks"]]
        out.append("* **Per benchmark:** " + ", ".join(per) + ".")
    out.append("")
    targets, sections = [], []
    for name, (title, reader) in readers().items():
        if name not in data:
            continue
        d = data[name]
        # a reader that compares with another benchmark of the same machine takes them all as `siblings`
        t, reading = reader(d, siblings=data) if "siblings" in inspect.signature(reader).parameters else reader(d)
        targets += t
        body = [f"### {title}", "", f"`{d['command']}` ({d['wall_time_s']:.0f} s)", ""]
        for table in d["tables"]:
            body += [markdown_table(table), ""]
        body += ["**Reading.** " + reading, ""]
        sections.append("\n".join(body))
    if targets:
        out += [markdown_table({"title": "Targets", "columns": ["target", "aim", "measured", "verdict"],
                                "rows": targets}), ""]
    out += sections
    return "\n".join(out)


def render(runs: dict) -> str:
    parts = [HEADER]
    if not runs:
        parts.append("No results yet: run `make bench`.\n")
    for tag, r in runs.items():
        parts.append(render_machine(tag, r["run"], r["data"]))
    return "\n".join(parts).rstrip() + "\n"


def write_report(results_dir: Path = BENCH_DIR / "results", out: Path = ROOT / "BENCHMARKS.md") -> Path:
    out = Path(out)
    out.write_text(render(load_runs(Path(results_dir))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(BENCH_DIR / "results"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    print(f"wrote {write_report(Path(args.results), Path(args.out))}")


if __name__ == "__main__":
    main()
