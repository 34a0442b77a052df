#!/usr/bin/env python
"""What the DPO reference policy costs: a second model in memory, or the same one with its adapter off.

Builds SmolLM2-135M-Instruct's shape (30 layers, d=576, 9/3 heads; random weights unless
--pretrained uses the cached converted checkpoint), puts a LoRTA r=4 adapter on it, and measures:

* the bytes of the base weights, and the process's resident memory before and after a deep copy of
  the model (what a separate reference model, as TRL keeps by default, would add);
* that the adapter-disabled network gives exactly the base model's log-probabilities after the
  adapter has been changed (so it is a valid reference), and the time of one reference forward pass.

Prints one JSON object.
"""

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", action="store_true", help="use the cached SmolLM2 checkpoint (fetched if missing)")
    p.add_argument("--tokens", type=int, default=96, help="sequence length of the timed forward pass")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    from esmfold_peft.adapters import LoRTAConfig, add_adapter, get_adapter_set

    if args.pretrained:
        from esmfold_peft.nlp.sources import ensure_smollm2

        model = LlamaForCausalLM.from_pretrained(str(ensure_smollm2()), dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                             tie_word_embeddings=True))
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    add_adapter(model, LoRTAConfig(rank=4, alpha=16))
    with torch.no_grad():
        for prm in get_adapter_set(model).parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # a trained-looking adapter
        adapted = model(input_ids=ids).logits
        t0 = time.perf_counter()
        with get_adapter_set(model).disabled():
            reference = model(input_ids=ids).logits
        ref_s = time.perf_counter() - t0
    base_bytes = sum(prm.numel() * prm.element_size() for n, prm in model.named_parameters() if not n.startswith("peft."))
    before = rss_mib()
    second = copy.deepcopy(model)
    after = rss_mib()
    result = {
        "model": "SmolLM2-135M-Instruct" + ("" if args.pretrained else " shape, random weights"),
        "base_weight_mib": round(base_bytes / 2**20, 1),
        "rss_before_copy_mib": round(before, 1), "rss_after_copy_mib": round(after, 1),
        "second_reference_model_adds_mib": round(after - before, 1),
        "adapter_changes_logits": bool((adapted - base_logits).abs().max() > 1e-3),
        "disabled_adapter_equals_base": bool(torch.equal(reference, base_logits)),
        "max_abs_diff_disabled_vs_base": float((reference - base_logits).abs().max()),
        "reference_forward_s": round(ref_s, 3), "tokens": args.tokens,
    }
    del second
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
