"""Write BENCHMARKS.md from the JSON under bench/results/<machine>/: every number in it comes from there.

Each machine's section is rendered from that machine's last `run_all.py` run (its `run.json` and
the benchmarks' JSON); the text around the tables is written here, and where it quotes a number or
says whether a target was met, it reads that from the same JSON.

    python bench/report.py            # re-render without running anything
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from common import BENCH_DIR, ROOT, markdown_table

BENCHMARKS = ("adapter_step", "adapter_profile", "merged_inference", "fold_step", "predict_throughput",
              "esm_attention", "predict_memory", "predict_memory_full_depth", "gpu_suite",
              "nlp_adapter_step", "nlp_dpo_reference", "compile_step")
TARGET_SHAPES = ("650M", "3B")
MiB = 2 ** 20

HEADER = """# Benchmarks

Does LoRTA cost no more than LoRA to train, and nothing at inference? Measured as ratios, one run per
machine, by the scripts in `bench/`; each prints its tables last and writes JSON to
`bench/results/<machine>/`. These are benchmarks, not timed tests: nothing here fails a build.

**Regenerate:** `make bench` (= `.venv/bin/python bench/run_all.py`) runs sections 1–4, one script
after the other, each in a fresh process, then rewrites this file from the JSON under
`bench/results/`; on a 2-core CPU machine it stays within 15 minutes by using smaller shapes, which
the tables state. Beside it, each writing its own JSON: `make bench-memory` (section 6, about 15
minutes), `make bench-long` (sections 5 and 6b, hours on 2 CPU cores), `make bench-nlp` (sections
8–9; installs `peft` for this benchmark only), `python bench/compile_step.py` (section 10) and
`make bench-gpu` (section 7, one H100/H200). Every section below names the command and run that
produced its numbers; the file holds no number those runs did not measure. `python bench/report.py`
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


# --- helpers -----------------------------------------------------------------------------------------

def _r(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def _verdict_le(s: dict, target: float = 1.0) -> str:
    if s["median"] <= target:
        return "met"
    if s["min"] <= target:
        return "not resolved (median above, spread includes the target)"
    return "missed"


def _verdict_ge(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def _mib(b) -> str:
    return "–" if b is None else f"{b / MiB:,.1f} MiB"


# --- reading paragraphs --------------------------------------------------------------------------------

def read_adapter_step(d: dict) -> tuple[list, str]:
    shapes = {r["shape"]: r for r in d["results"]}
    targets = []
    lines = []
    vs_floor = [v["vs_floor"]["median"] for r in d["results"] for n, v in r["variants"].items()
                if n != "floor" and "dense" not in n]
    eq = "; ".join(f"{s}: r=1 {_r(r['ratios']['LoRTA/LoRA r=1 time'])}, r=8 {_r(r['ratios']['LoRTA/LoRA r=8 time'])}"
                   for s, r in shapes.items())
    lines.append(
        "*Time.* Bound by the frozen weights' matrix products. The floor is one forward pass; an adapted step adds "
        "the backward pass through the frozen LM (input gradients only, about one more forward's worth of products) "
        "and the adapter's own thin products, O(N·r·d) per projection against O(N·d²) for the frozen weight, so "
        f"every efficient adapted variant costs {min(vs_floor):.2f}–{max(vs_floor):.2f}× the floor and its rank "
        f"barely shows. LoRTA/LoRA at equal rank (time): {eq}.")
    for s in TARGET_SHAPES:
        if s in shapes:
            for rank in (1, 8):
                q = shapes[s]["ratios"][f"LoRTA/LoRA r={rank} time"]
                targets.append([f"LoRTA step time ≤ LoRA, r={rank}, {s} shape", "≤ 1", _r(q), _verdict_le(q)])
    dense = {s: r["ratios"]["dense/efficient r=8 time"] for s, r in shapes.items()}
    lines.append(
        "Dense materialisation adds to each projection three N·d² products (x ΔWᵀ, its input gradient and the "
        "weight gradient of ΔW) on top of the two of the frozen path (forward and input gradient); attention "
        "holds a third of a layer's weight products, so about 1.5× the efficient step is the arithmetic floor "
        "(less in the first layer, whose input needs no gradient, and at small width, where attention scores, "
        "norms and activations weigh more). Dense/efficient time: "
        + "; ".join(f"{s} {_r(q)}" for s, q in dense.items()) + ".")
    if "3B" in dense:
        targets.append(["dense/efficient step time, r=8, 3B shape", "≥ 1.5", _r(dense["3B"]),
                        _verdict_ge(dense["3B"]["median"], 1.5)])
    big = shapes.get("3B") or d["results"][-1]
    dm = big["ratios"]["dense/efficient r=8 memory above floor"]
    lm = big["ratios"]["LoRTA/LoRA r=8 memory above floor"]
    extra = big["variants"]["LoRTA r=8 dense"]["above_floor_bytes"] - big["variants"]["LoRTA r=8"]["above_floor_bytes"]
    sweep = big.get("memory_sweep") or {}
    sweep_txt = ", ".join(f"{v['LoRTA r=8 dense'] / v['LoRTA r=8']:.2f} at {v['tokens']} tokens"
                          for v in sweep.values() if v and v["LoRTA r=8"] > 0)
    meets = [v["tokens"] for v in sweep.values() if v and v["LoRTA r=8"] > 0
             and v["LoRTA r=8 dense"] / v["LoRTA r=8"] >= 5]
    tok = big["batch"] * big["length"]
    lines.append(
        "*Memory.* Above the floor every adapter holds what backward needs: the activations of every layer, which "
        "grow with the tokens per step, plus its own parameters, gradients and Adam state (kilobytes to a few MiB). "
        f"LoRTA holds {lm:.3f}× LoRA's at r=8 on the {big['shape']} shape. The dense path also keeps, in every "
        f"layer whose input needs a gradient, the four d×d ΔW it multiplied with ({_mib(extra)} more than the "
        f"efficient path here). The dense/efficient ratio above the floor is therefore 1 + ΔW/activations: "
        f"{dm:.2f} at {tok} tokens" + (f"; against tokens per step: {sweep_txt}" if sweep_txt else "") + ". "
        + ("The ≥ 5× target holds only " + (f"up to {max(meets)} tokens per step in this sweep" if meets else
                                             "at none of the token counts measured")
           + ": it needs the ΔW to outweigh the activations, which stops as the tokens per step grow (the ΔW do "
             "not grow with them). The efficient path itself adds next to nothing beyond the activations any "
             "adapter needs (LoRTA/LoRA memory above the floor above)."))
    targets.append([f"dense/efficient memory above floor, r=8, {big['shape']} shape, {tok} tokens", "≥ 5",
                    f"{dm:.2f}", _verdict_ge(dm, 5.0)])
    return targets, "\n\n".join(lines)


def read_adapter_profile(d: dict) -> tuple[list, str]:
    ratios = d.get("ratios", {})
    txt = "; ".join(f"{k} {_r(q)}" for k, q in ratios.items())
    targets = [[f"LoRTA/LoRA, the adapters alone, {k}, {d['layout']['d_model']}-wide", "≤ 1", _r(q), _verdict_le(q)]
               for k, q in ratios.items()]
    return targets, (
        "With the frozen model taken away this is the adapters' own work, which the full step hides (there it is a "
        f"few percent of the step, less than the round-to-round noise). LoRTA/LoRA: {txt}. Per layer LoRTA runs 18 "
        "thin products (6 forward, 12 backward; x A is shared by q, k and v) against LoRA's 24, but thin products "
        "are bound by memory traffic over the N×d activations and by the BLAS kernel each operand layout selects, "
        "not by their FLOPs; at small width and rank the few tiny ops that form LoRTA's per-call factors (w, Kᵀ, "
        "Aᵀ) also show. Profiling this benchmark (`--profile`; per-op self times are in the JSON) on the first "
        "LoRTA implementation showed autograd computing its factor gradients as (d×N)(N×r) products, several "
        "times slower per call on this CPU than the (r×N)(N×d) orientation; `lorta.py` now forms Aᵀ and Kᵀ as "
        "contiguous r×d matrices, so every factor gradient takes the fast orientation.")


def read_merged(d: dict) -> tuple[list, str]:
    res = d["results"]
    merged = {r["shape"]: r["variants"]["LoRTA r=8 merged"]["vs_base"] for r in res}
    worst = max(abs(s["median"] - 1) for s in merged.values())
    targets = [[f"merged / base forward time, {s} shape", "1.00 ± 0.02", _r(q),
                "met" if abs(q["median"] - 1) <= 0.02 else "missed"] for s, q in merged.items()]
    unm = "; ".join(f"{r['shape']} LoRTA {r['variants']['LoRTA r=8 unmerged']['vs_base']['median']:.3f}, "
                    f"LoRA {r['variants']['LoRA r=8 unmerged']['vs_base']['median']:.3f}" for r in res)
    return targets, (
        "Merging folds ΔW into the weights and removes the hooks, so the merged model runs the base model's code "
        f"on weights of the same shapes: merged/base stays within {worst:.3f} of 1 (medians). The outputs confirm "
        "it is a real merge (the final representations move: max abs(merged − base) > 0) of the same function "
        "(max abs(merged − unmerged) is float rounding). Unmerged, every projection also pays the adapter's thin "
        "products and the addition of Δy, "
        f"passes over N×d activations that weigh more at small width: {unm}.")


def read_fold(d: dict) -> tuple[list, str]:
    v = d["variants"]
    fro = v["none"]
    extra = v["full"]["trainable_parameters"] - fro["trainable_parameters"]
    ckpt = ", recomputed during backward (block checkpointing)," if d["model"].get("checkpoint_blocks") else ""
    return [], (
        f"Bound by the trunk: {d['model']['trunk_blocks']} block(s) with a {d['model']['c_s']}-wide sequence track "
        f"and a {d['model']['c_z']}-wide pair track{ckpt} against the language model {d['model']['lm']}, "
        f"{d['parameters']['language_model']:,} parameters. An adapted LM adds the backward pass through the LM "
        "and the adapter's products: "
        f"LoRA r=1 {_r(v['lora r=1']['vs_frozen'])} and LoRTA r=8 {_r(v['lorta r=8']['vs_frozen'])} of the "
        f"frozen step's time, {v['lora r=1']['peak_bytes'] / fro['peak_bytes']:.3f} and "
        f"{v['lorta r=8']['peak_bytes'] / fro['peak_bytes']:.3f} of its memory. Full fine-tuning adds the LM's "
        f"weight gradients and Adam state ({extra:,} more trainable parameters): {_r(v['full']['vs_frozen'])} "
        f"time, {v['full']['peak_bytes'] / fro['peak_bytes']:.3f} memory. Longer crops make the trunk's L² and L³ "
        "terms grow and the LM's share shrink.")


def read_predict(d: dict) -> tuple[list, str]:
    ls = d["config"]["lengths"]
    rps = {L: d["lengths"][str(L)]["residues_per_second"]["median"] for L in ls}
    sec = {L: d["lengths"][str(L)]["seconds_per_prediction"]["median"] for L in ls}
    rec = d["config"]["recycles"]
    lo, hi = ls[0], ls[-1]
    return [], (
        "Per prediction the LM and the sequence track grow with L (their attention with L²), the pair track with "
        "L² and the triangular updates with L³, so the cost per residue grows with length; residues per second: "
        + ", ".join(f"{rps[L]:.1f} at {L}" for L in ls)
        + f" ({sec[hi] / sec[lo]:.1f}× the time for {hi / lo:.0f}× the residues from {lo} to {hi}). "
        f"With {rec} recycle(s) the trunk runs {rec + 1} times per prediction and the LM once.")


def read_esm_attention(d: dict) -> tuple[list, str]:
    targets, parts, missing = [], [], []
    for r in d["results"]:
        label = r["shape"] + ("" if r["layers"] == r["layers_full"] else f" at {r['layers']}/{r['layers_full']} layers")
        both = {L: m for L, m in r["lengths"].items() if m.get("ratios")}
        for L, m in r["lengths"].items():
            if not m.get("ratios"):
                gone = [n for n, v in m.get("variants", {}).items() if v["status"] != "ok"]
                missing.append(f"{label}, L={L}: " + (", ".join(gone) + " out of memory" if gone
                                                     else m["status"].replace("_", " ")))
        if not both:
            continue
        longest = list(both)[-1]
        q = both[longest]["ratios"]["sdpa/original transient memory"]
        targets.append([f"SDPA/original activation memory, {label}, L={longest}", "< 1",
                        "–" if q is None else f"{q:.3f}", "met" if q is not None and q < 1 else "missed"])
        parts.append(f"{label}: " + ", ".join(
            f"L={L} time {_r(m['ratios']['sdpa/original time'])}, activations "
            + ("–" if m["ratios"]["sdpa/original transient memory"] is None
               else f"{m['ratios']['sdpa/original transient memory']:.2f}") for L, m in both.items()))
    diffs = [m["max_abs_diff_final_representation"] for r in d["results"] for m in r["lengths"].values()
             if m.get("ratios")]
    per_layer = []  # the same shape and length at two depths: the difference is (layers apart) × one layer
    for lo in d["results"]:
        for hi in d["results"]:
            if lo["shape"] != hi["shape"] or lo["layers"] >= hi["layers"]:
                continue
            for L in set(lo["lengths"]) & set(hi["lengths"]):
                a, b = lo["lengths"][L], hi["lengths"][L]
                if not (a.get("ratios") and b.get("ratios")):
                    continue
                n = hi["layers"] - lo["layers"]
                act = {v: (b["variants"][v]["transient_bytes"] - a["variants"][v]["transient_bytes"]) / n
                       for v in ("original", "sdpa")}
                sec = {v: (b["variants"][v]["seconds_per_step"]["median"]
                           - a["variants"][v]["seconds_per_step"]["median"]) / n for v in ("original", "sdpa")}
                if act["original"] > 0 and sec["original"] > 0:
                    per_layer.append(
                        f"{lo['shape']} at L={L}, from its {lo['layers']}- and {hi['layers']}-layer rows: activations "
                        f"{_mib(act['original'])} → {_mib(act['sdpa'])} ({act['sdpa'] / act['original']:.2f}), time "
                        f"{sec['original'] * 1e3:.0f} → {sec['sdpa'] * 1e3:.0f} ms ({sec['sdpa'] / sec['original']:.2f}; "
                        "medians of separate runs)")
    return targets, (
        "fair-esm's attention keeps, in every layer, the scores and probabilities ((heads·L)×L each) for backward; "
        "SDPA keeps O(L) per head. The activations saved therefore grow with L², and SDPA/original falls with "
        "length (the rest of a layer's activations grow with L only). SDPA/original: " + ("; ".join(parts) or "–")
        + "." + (f" Per layer (difference of two depths ÷ the layers between them): {'; '.join(per_layer)}; a run "
                 "with fewer layers than the model also counts, in both variants, a part that does not grow with "
                 "depth, so its ratios understate the per-layer saving." if per_layer else "")
        + (f" Not measured: {'; '.join(missing)}." if missing else "")
        + (f" Both variants compute the same function (largest difference in the final representations "
           f"{max(diffs):.1e})." if diffs else ""))


def read_predict_memory(d: dict) -> tuple[list, str]:
    t = d["target"]
    cells = d["cells"]
    by = {(c["length"], c["variant"]): c for c in cells}
    limit = f"{t['limit_gib']:g} GiB" if t["limit_gib"] else "the device's memory"
    targets = []
    fitting = [v for v, x in t["variants"].items() if x["fits"]]
    best = min((x for x in t["variants"].values() if x["fits"]), key=lambda x: x["peak_rss_bytes"], default=None)
    targets.append([f"{t['length']} residues within {limit}, some saving", "fits",
                    f"{', '.join(fitting) or 'none fits'}"
                    + (f" (peak RSS {best['peak_rss_bytes'] / 2 ** 30:.2f} GiB)" if best else ""),
                    "met" if fitting else "missed"])
    failed = [f"{c['variant']} at {c['length']} ({c['status'].replace('_', ' ')}"
              + (f" in the {c['failed_in_phase']}" if c.get("failed_in_phase") else "") + ")"
              for c in cells if c["status"] != "ok"]
    parts = []
    for (length, v), c in sorted(by.items()):
        if c["status"] == "ok" and v != "none" and (length, "none") in by and by[(length, "none")]["status"] == "ok":
            parts.append(f"{v} at {length}: {c['peak_tensor_bytes'] / by[(length, 'none')]['peak_tensor_bytes']:.2f}")
    k = d["config"]["blocks_run"] or d["model"]["trunk_blocks"]
    depth = ("" if k == d["model"]["trunk_blocks"] else
             f" Each cell kept all {d['model']['trunk_blocks']} trunk blocks in memory but ran {k} (the peak is reached "
             "inside any one block; the full-depth time is an estimate).")
    return targets, (
        "Inference keeps no activations for backward, so the peak is the largest transient of one step: in the "
        "trunk, triangular attention's heads·L³ scores (16 GiB in float32 at 1,024 residues), which chunking "
        "splits into pieces of 64 rows; the LM's savings (SDPA, bf16 storage) act on the language model only, "
        "a small part of the peak with a 35M LM. Peak tensor bytes against none: " + (", ".join(parts) or "–")
        + ". " + (("Did not fit: " + "; ".join(failed) + ".") if failed else "Every cell fit.") + depth)


def read_predict_memory_full_depth(d: dict, siblings: dict) -> tuple[list, str]:
    """Section 6b: predict_memory.py with every trunk block run (`--blocks-run 0`) against section 6's
    estimate from one block. Shows its own comparison table in place of the run's tables (which repeat
    section 6's layout); renders whatever cells the run has."""
    one = siblings.get("predict_memory")  # the same machine's section 6 run
    est = {(c["length"], c["variant"]): c for c in (one["cells"] if one else ()) if c["status"] == "ok"}
    one_k = one and (one["config"]["blocks_run"] or one["model"]["trunk_blocks"])
    gib = 2 ** 30
    rows, ratios, peaks, spreads = [], [], [], []
    for c in d["cells"]:
        e = est.get((c["length"], c["variant"]))
        if c["status"] != "ok":
            rows.append([c["length"], c["variant"], c["status"].replace("_", " ")] + ["–"] * 6)
            continue
        b = c.get("block_seconds") or []
        full = c["seconds"]
        r = full / e["seconds_full_depth_estimate"] if e else None
        pk = c["peak_tensor_bytes"] / e["peak_tensor_bytes"] if e else None
        if r is not None:
            ratios.append(f"{r:.2f} at {c['length']}")
            peaks.append(pk)
        if b:
            spreads.append(f"{min(b):.1f}–{max(b):.1f} s at {c['length']}")
        rows.append([c["length"], c["variant"], f"{full:.0f}",
                     f"{min(b):.1f}–{max(b):.1f}" if b else "–",
                     f"{e['seconds_full_depth_estimate']:.0f}" if e else "–",
                     "–" if r is None else f"{r:.2f}",
                     f"{c['peak_tensor_bytes'] / gib:.2f}" + (f" / {e['peak_tensor_bytes'] / gib:.2f}" if e else ""),
                     f"{c['peak_rss_bytes'] / gib:.2f}" + (f" / {e['peak_rss_bytes'] / gib:.2f}" if e else ""),
                     "–" if pk is None else f"{pk:.3f}"])
    blocks = d["model"]["trunk_blocks"]
    clock = "process CPU seconds (one thread)" if d.get("clock") == "cpu" else "wall seconds"
    d["tables"] = [{  # in place of the run's own tables
        "title": f"Prediction at full depth: all {blocks} trunk blocks run, against section 6's estimate "
                 f"({one_k or '–'} block(s) run)",
        "columns": ["length", "savings", f"s, {blocks} blocks measured", "s per block, min–max", f"s, {blocks} blocks, section 6 est.",
                    "measured / estimate", "peak tensor GiB, full / sec. 6", "peak RSS GiB, full / sec. 6",
                    "peak tensor full / sec. 6"],
        "rows": rows or [["–"] * 9],
        "notes": [f"One prediction per cell in a fresh process, as section 6 ({d['config']['recycles']} recycles, "
                  f"{d['config']['memory_limit_gib']:g} GiB address-space limit); seconds: {clock}, one call each, "
                  "with the memory tracker's per-op cost. Section 6's estimate = its measured call with "
                  f"{one_k or '–'} block(s) + the remaining blocks × the run block's time, from a different run "
                  "(another process, at another time on the shared machine)."]}]
    if not d["cells"] or one is None:
        return [], ("All trunk blocks run." + ("" if one else " No section 6 run on this machine to compare with."))
    text = (f"Section 6 runs {one_k} of the {blocks} trunk blocks and reports the full-depth time as an estimate; "
            f"here all {blocks} run. Measured / estimate: {', '.join(ratios) or '–'}.")
    if spreads:
        text += (f" The estimate assumes every block costs what the first does (the same shapes in each); the "
                 f"blocks' own times span {'; '.join(spreads)}.")
    if peaks:
        span = f"{min(peaks):.3f}" + ("" if f"{min(peaks):.3f}" == f"{max(peaks):.3f}" else f"–{max(peaks):.3f}")
        text += (f" Peak tensor bytes full depth / section 6: {span} (each block frees "
                 "the previous one's activations, so the peak is reached inside one block).")
    return [], text


def read_gpu_suite(d: dict) -> tuple[list, str]:
    targets, parts = [], []
    if "lm" in d:
        for r in d["lm"]["results"]:
            for rank in (1, 8):
                q = r["ratios"][f"LoRTA/LoRA r={rank} time"]
                targets.append([f"GPU LoRTA/LoRA step time, r={rank}, {r['shape']} (all {r['layers']} layers)", "≤ 1",
                                _r(q), _verdict_le(q)])
    if "fold" in d:
        f = d["fold"]
        parts.append("Folding step (crop " + str(f["config"]["crop"]) + "): " + ", ".join(
            f"{v} {x['seconds_per_step']['median']:.3f} s" + (f" (MFU {x['mfu']:.1%})" if x["mfu"] is not None else "")
            for v, x in f["variants"].items()) + ".")
    if "predict" in d:
        p = d["predict"]
        parts.append("Prediction against fair-esm's ESMFold.infer (" + p["shape"] + "): " + ", ".join(
            f"L={L} ours {_r(x['variants']['ours']['vs_fair_esm'])}, bf16 LM "
            f"{_r(x['variants']['ours, bf16 LM']['vs_fair_esm'])} of its time" for L, x in p["lengths"].items()) + ".")
    if "ddp" in d and "skipped" not in d["ddp"]:
        x = d["ddp"]
        parts.append(f"DDP ({x['backend']}, {x['world_size']} processes): {x['seconds_per_step']:.3f} s/step, "
                     f"parameter spread {x['max_parameter_spread_across_processes']:.1e}.")
    elif "ddp" in d:
        parts.append(f"DDP: skipped ({d['ddp']['skipped']}).")
    return targets, " ".join(parts)


def _span(values, digits: int = 2) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _verdict_near(s: dict, target: float = 1.0, tolerance: float = 0.05) -> str:
    if abs(s["median"] - target) <= tolerance:
        return "met"
    if s["min"] <= target + tolerance and s["max"] >= target - tolerance:
        return "not resolved (median outside, spread reaches the band)"
    return "missed"


def _worst(verdicts) -> str:
    for v in verdicts:
        if v == "missed":
            return v
    return next((v for v in verdicts if v != "met"), "met")


def read_nlp_adapter_step(d: dict) -> tuple[list, str]:
    res, ranks = d["results"], d["ranks"]
    adapted = [v for r in res for n, v in r["variants"].items() if n != "floor"]
    lines = [
        "*Time.* An adapted step adds the backward pass through the frozen model (input gradients) and the "
        "adapter's thin products to the floor's forward pass, so every adapted variant costs "
        f"{_span([v['vs_floor']['median'] for v in adapted])}× the floor ("
        + "; ".join(f"{r['shape']} {r['layers']}/{r['layers_full']} layers at {r['batch']}×{r['length']} tokens, "
                    f"{r['attention']} attention" for r in res) + ")."]
    if not d.get("peft"):
        lines.append("PEFT was not run (--no-peft), so this run has no comparison.")
        return [], "\n\n".join(lines)
    targets = []
    for method, aim, verdict in (("LoRTA", "≤ 1", _verdict_le), ("LoRA", "≈ 1 (within 0.05)", _verdict_near)):
        for r in res:
            qs = [r["ratios"][f"ours {method}/PEFT LoRA r={k} time"] for k in ranks]
            targets.append([f"ours {method} / PEFT LoRA step time, {r['shape']}", aim,
                            "; ".join(f"r={k} {_r(q)}" for k, q in zip(ranks, qs)), _worst([verdict(q) for q in qs])])

    def ratios(method, what):
        return [r["ratios"][f"ours {method}/PEFT LoRA r={k} {what}"] for r in res for k in ranks]

    times = ratios("LoRA", "time") + ratios("LoRTA", "time")
    near = all(abs(q["median"] - 1) <= 0.1 for q in times)
    lines.append(
        "Ours against PEFT at equal rank, step time (medians of per-round ratios over the shapes and ranks): "
        f"LoRA {_span([q['median'] for q in ratios('LoRA', 'time')], 3)}, "
        f"LoRTA {_span([q['median'] for q in ratios('LoRTA', 'time')], 3)}; single rounds range from "
        f"{min(q['min'] for q in times):.3f} to {max(q['max'] for q in times):.3f}"
        + (", so this run cannot tell apart differences of a few percent" if near else "")
        + f"; {sum(q['min'] <= 1 <= q['max'] for q in times)} of the {len(times)} cells have rounds on both sides "
        "of 1. Both LoRAs run the same two thin products per projection, x Aᵀ and a product with Bᵀ, beside the "
        "frozen model's products: ours adds Δy in a forward hook on the frozen Linear; PEFT's wrapper module calls the Linear and two adapter Linears and multiplies the N×out product "
        "by alpha/r (at scale 1 too). LoRTA runs fewer thin products per layer than LoRA (x A is shared by q, k "
        "and v) plus a few tiny ops that form its per-call factors (section 1b).")
    mem = {m: [q for q in ratios(m, "memory above floor") if q is not None] for m in ("LoRA", "LoRTA")}
    big = max(res, key=lambda r: r["variants"]["floor"]["peak_bytes"])
    above = [v["above_floor_bytes"] for n, v in big["variants"].items() if n != "floor"]
    top = max(ranks)
    bv = big["variants"]
    lora_extra = bv[f"ours LoRA r={top}"]["above_floor_bytes"] - bv[f"PEFT LoRA r={top}"]["above_floor_bytes"]
    kv = big["kv_heads"] * big["d_model"] // big["heads"]
    b_bytes = top * (2 * big["d_model"] + 2 * kv) * big["layers"] * 4  # Bᵀ of q, k, v, o in float32
    lorta_less = bv[f"PEFT LoRA r={top}"]["above_floor_bytes"] - bv[f"ours LoRTA r={top}"]["above_floor_bytes"]
    lines.append(
        "*Memory.* Above the floor every variant keeps what backward needs, the activations of every layer "
        f"({_span([a / MiB for a in above], 1)} MiB on {big['shape']}), plus its own parameters, gradients and "
        f"Adam state. Ours / PEFT memory above the floor: LoRA {_span(mem['LoRA'], 3)}, LoRTA "
        f"{_span(mem['LoRTA'], 3)} over the shapes and ranks. On {big['shape']} at r={top} our LoRA keeps "
        + ("exactly what PEFT's keeps: both scale the thin N×r product and keep no scaled copy of Bᵀ"
           if lora_extra == 0 else f"{_mib(lora_extra)} more than PEFT's")
        + (f", the size of the scaled copies of Bᵀ ({_mib(b_bytes)}) that the LoRA of this run's code (commit "
           f"{d['machine']['commit']}) kept for backward; lora.py has since scaled the thin N×r product instead, as "
           "PEFT scales its product, which keeps no copy (`make bench-nlp` measures it again)"
           if lora_extra and abs(lora_extra - b_bytes) <= 0.1 * b_bytes else "")
        + ". Our LoRTA keeps "
        f"{_mib(lorta_less)} less than PEFT's LoRA: {bv[f'ours LoRTA r={top}']['trainable_parameters']:,} "
        f"parameters against {bv[f'PEFT LoRA r={top}']['trainable_parameters']:,}, each with a gradient and two "
        "Adam moments.")
    worst = max(res, key=lambda r: r["parity"]["max_abs_diff_ours_vs_peft"])
    p = worst["parity"]
    moved = _span([r["parity"]["max_abs_change_from_frozen"] for r in res], 1)
    lines.append(
        "*Parity.* With the same factor values our LoRA and PEFT's compute the same function: "
        + ("their last hidden states are identical on every shape" if p["max_abs_diff_ours_vs_peft"] == 0 else
           f"the largest difference of the last hidden states is {p['max_abs_diff_ours_vs_peft']:.1e} "
           f"({worst['shape']})")
        + f", while the adapter moves them by up to {moved} from the frozen model's. "
        f"peft {d['peft']}, transformers {d['transformers']}.")
    return targets, "\n\n".join(lines)


def read_nlp_dpo_reference(d: dict) -> tuple[list, str]:
    v, m, c = d["variants"], d["memory"], d["checks"]
    dis, cp, ca = v["adapter disabled"], v["deep copy"], v["cached"]
    saved = cp["peak_bytes"] - dis["peak_bytes"]
    exact = c["disabled_adapter_equals_frozen"]
    targets = [
        ["DPO reference with the adapter disabled = the frozen model's log-probabilities", "exact",
         f"max abs difference {c['max_abs_disabled_minus_frozen']:.1e}", "met" if exact else "missed"],
        ["DPO step peak memory, adapter disabled / deep copy", "< 1",
         f"{dis['peak_bytes'] / cp['peak_bytes']:.3f} ({_mib(saved)} less)",
         "met" if dis["peak_bytes"] < cp["peak_bytes"] else "missed"]]
    text = (
        f"A separate reference model holds a second set of weights: {_mib(m['base_weight_bytes'])} of tensors here "
        f"({d['model']}); the deep copy raised the process's resident set size by "
        f"{_mib(m['deep_copy_rss_bytes'])}. The "
        f"disabled-adapter reference needs none of it: one DPO step's peak is {_mib(dis['peak_bytes'])} against "
        f"{_mib(cp['peak_bytes'])} with a copy, and its log-probabilities are "
        + ("exactly the frozen model's (torch.equal" if exact else "not the frozen model's (")
        + f", after the adapter moved the policy's by up to {c['max_abs_policy_minus_frozen']:.2f}), because a "
        "disabled hook returns before computing anything. Its step time is "
        f"{_r(dis['vs_deep_copy'])} of the copy's: the same forward pass through the same weights. Caching the "
        "reference log-probabilities before training (the harness's default) takes that forward out of every "
        f"step: {_r(ca['vs_deep_copy'])} of the copy's step time, for {m['cache_bytes_per_pair']} bytes per pair; a "
        f"reference forward alone costs {_r(v['reference forward alone']['vs_deep_copy'])} of a step with the copy. "
        + (f"Caching leaves the peak where it was ({_mib(ca['peak_bytes'])}): the reference forward runs without "
           "gradient and frees its activations before the policy's forward begins."
           if abs(ca["peak_bytes"] - dis["peak_bytes"]) <= 0.01 * dis["peak_bytes"] else
           f"With caching the peak is {_mib(ca['peak_bytes'])}."))
    return targets, text

def read_compile_step(d: dict) -> tuple[list, str]:
    targets, parts, amortise = [], [], []
    for key, label in (("fold", "folding step"), ("lm", "ESM-2 step"), ("predict", "prediction")):
        if key not in d:
            continue
        x = d[key]
        eager = x["variants"][x["order"][0]]
        cold = cached = 0.0  # the fold part compiles `both` after `trunk`: its times are the LM's alone
        for name in x["order"][1:]:
            v = x["variants"][name]
            again = v.get("cached_compile_seconds")
            cold, cached = cold + v["compile_seconds"], cached + (again or 0.0)
            q = v["vs_eager"]
            what = f"{label}, {'model.compile=' + name if key != 'lm' else 'layers compiled'}"
            targets.append([f"compiled / eager time, {what}", "< 1", _r(q), _verdict_le(q)])
            notes = ([] if again is None else [f"{again:.0f} s from filled caches"]) + \
                (["the LM's, after the trunk's"] if name == "both" else [])
            rel = v["max_rel_factor_gradient_difference"]
            parts.append(f"{what}: {_r(q)} of the eager time, "
                         + ("–" if v["memory_vs_eager"] is None else f"{v['memory_vs_eager']:.2f}")
                         + f" of its step memory, compiled in {v['compile_seconds']:.0f} s"
                         + (f" ({'; '.join(notes)})" if notes else "")
                         + f"; max |Δ| output {v['max_abs_output_difference']:.1e} (largest value "
                         f"{v['output_scale']:.1e})"
                         + ("" if rel is None else f", factor gradients {rel:.1e} relative"))
            saving = eager["seconds_per_step"]["median"] - v["seconds_per_step"]["median"]
            if q["median"] < 1 and saving > 0:
                amortise.append(f"{what} after {cold / saving:,.0f} steps"
                                + ("" if again is None else f" ({cached / saving:,.0f} with the caches filled)"))
    clock = "CPU" if d["device"] == "cpu" else "wall"
    text = ("Each trunk block and each LM layer is compiled on its own; recycling, the structure module, the "
            "losses and the optimizer stay eager. Compiled against eager on the same weights and input ("
            f"backend {d['backend']}, compile times in {clock} seconds): " + "; ".join(parts) + ". ")
    text += (("The per-step saving repays the compile time: " + "; ".join(amortise) + ".") if amortise else
             "No compiled variant was faster than eager here: on this machine compiling costs its compile time "
             "and saves nothing.")
    if d["device"] == "cpu":
        text += " On GPU the GPU suite's section (e) measures the same switch."
    return targets, text


READERS = {"adapter_step": ("1. Adapter step cost", read_adapter_step),
           "adapter_profile": ("1b. The adapters alone", read_adapter_profile),
           "merged_inference": ("2. Merged inference", read_merged),
           "fold_step": ("3. Folding step", read_fold),
           "predict_throughput": ("4. Prediction throughput", read_predict),
           "esm_attention": ("5. Long sequences: ESM-2 attention through SDPA", read_esm_attention),
           "predict_memory": ("6. Long sequences: prediction memory", read_predict_memory),
           "predict_memory_full_depth": ("6b. Prediction at full depth", read_predict_memory_full_depth),
           "gpu_suite": ("7. GPU suite", read_gpu_suite),
           "nlp_adapter_step": ("8. NLP adapters against Hugging Face PEFT", read_nlp_adapter_step),
           "nlp_dpo_reference": ("9. DPO reference: the adapter disabled against a copy", read_nlp_dpo_reference),
           "compile_step": ("10. torch.compile", read_compile_step)}


# --- the file ----------------------------------------------------------------------------------------

def load_runs(results_dir: Path, include_smoke: bool = False) -> dict:
    runs = {}
    if not results_dir.is_dir():
        return runs
    for folder in sorted(p for p in results_dir.iterdir()
                         if p.is_dir() and (include_smoke or not p.name.endswith("-smoke"))):
        data = {name: json.loads((folder / f"{name}.json").read_text())
                for name in BENCHMARKS if (folder / f"{name}.json").is_file()}
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
    for name in BENCHMARKS:
        if name not in data:
            continue
        title, reader = READERS[name]
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
