"""Benchmark 11: many adapters, one model: mixed-adapter batches against one adapter, the split fallback and PEFT.

One batch of N protein records through an ESM-2-shaped language model, as ESMFold calls it
(`model(tokens, repr_layers=range(L + 1))`: every layer's representation and the LM head), eval
mode, no gradient, where record b is to run with its own adapter names[b]. The library holds
`max(--adapters)` resident adapters, each with seeded nonzero factors (a trained adapter; B is zero
at initialisation). The cell "K distinct adapters per batch" assigns them round-robin: record b
uses adapter b mod K, so a batch of N ≥ K records uses exactly K distinct adapters (the script
refuses N < K). Variants, all on the same N records:

* floor: one LoRTA r=8 adapter merged into the weights (`get_adapter_set(model).merge()`: the base
  model's code);
* one adapter unmerged: the same adapter, applied by the hooks to the whole batch (`set_active`);
* ours mixed LoRTA r=8: `AdapterSet.routed(names)`: every adapted projection gathers each
  record's factors from the stacked library and adds its Δy in one batched contraction, no loop
  over records or adapters (esmfold_peft/adapters/mixed.py);
* split by adapter: the batch grouped by adapter, each group run as a batch of its own with that
  adapter active, the outputs put back in record order (`split_by_adapter`): how a one-active-
  adapter API serves several adapters (PEFT's `set_adapter` between sub-batches);
* ours mixed LoRA r=1 and r=8: the same gathered path over LoRA libraries;
* on Hugging Face's ESM (`transformers.EsmForMaskedLM` of the same shape, loaded with the fair-esm
  model's weights, so it computes the same function): its base model; our mixed LoRTA r=8 on it
  (the same library); PEFT's mixed-adapter LoRA (`peft` 0.21.2: the adapters added with
  `add_adapter`, the forward called with `adapter_names=[...]`, which PEFT runs as a loop over the
  batch's distinct adapters at every adapted Linear) at r=1 and r=8. LoRTA r=8 has
  r·(d + d_H + H + L + 4) parameters (4,320 at the 35M shape), LoRA r·2d per matrix and layer
  (46,080·r): no LoRA rank has LoRTA r=8's count, r=1 (the smallest) has about 10× as many, so the
  equal-parameter comparison is r=1 and the equal-rank one r=8.

q, k, v and o are adapted in every variant (PEFT: exactly `attention.self.{query,key,value}` and
`attention.output.dense`, not the MLP's `output.dense`), alpha = r. The variants run interleaved
(bench/common.py); throughput is N / (seconds per batch), and each ratio is taken within a round.
Before timing, a few records of each mixed batch are run alone with their adapter and compared
(float32), as are the split and mixed outputs and the two ESM implementations.

Memory: the bytes a resident adapter costs, at the full 35M shape: ours as `MixedAdapters` holds it
(its one copy: a slot of the stacked factors the gathered forward reads, on the model's device) and
PEFT's adapter parameters; the largest library
that fits in 1 GiB follows from them.

    python bench/mixed_adapters.py                  # the device's default sizes
    python bench/mixed_adapters.py --adapters 1,64 --records 64
    python bench/mixed_adapters.py --smoke          # a tiny model, seconds
    python bench/mixed_adapters.py --no-peft        # without PEFT (also when peft is not installed)

PEFT is not a dependency of the package (the test extra installs it): without it, its variants
are left out with a note.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
import warnings

import torch

from adapter_step import build_lm, random_tokens, shape_dims
from common import (GiB, SMOKE_RUNS, autocast, base_parser, finish, fmt_ratio, interleaved, load_average,
                    pick_device, ratio_summary, run_conf, set_threads, span, summary)
from esmfold_peft.adapters import (AdapterSet, LoRAConfig, LoRTAConfig, add_adapter, architecture, attach,
                                   build_adapter, get_adapter_set)
from esmfold_peft.adapters.layouts import only_family_differs
from esmfold_peft.adapters.mixed import MixedAdapters
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.errors import UserError

ARCH = "esm2_t12_35M"
SMOKE_ARCH = (2, 64, 4)  # (layers, d, heads)
# device kind -> (layers or None for all, records per batch, tokens per record with cls and eos). CPU: one of
# the 35M shape's 12 layers (its width and heads set the per-projection arithmetic) and short records, so that
# every cell up to 512 distinct adapters runs on one batch within a few minutes.
DIMS = {"cpu": (1, 512, 32), "cuda": (None, 512, 128)}
SMOKE_DIMS = (None, 4, 16)
ADAPTERS = (1, 8, 64, 512)
SMOKE_ADAPTERS = (1, 2, 4)
RANK = 8  # LoRTA's rank
LORA_RANKS = (1, 8)  # equal parameters (the smallest LoRA) and equal rank
# CUDA: fewer calls than the other benchmarks, as the split fallback at 512 adapters runs 512 forwards per call
DEFAULTS = {"cpu": dict(repeats=5, steps=1, warmup=1), "cuda": dict(repeats=7, steps=2, warmup=2)}
CHECK_RECORDS = 3  # records of each mixed batch also run alone
CHECK_TOLERANCE = 1e-4  # max |Δ| relative to max(1, max |output|), float32: the script stops above it
MEMORY_LIBRARY = 16  # adapters put in a library to measure the bytes per adapter
GOALS = ((64, 0.8), (512, 0.6))  # mixed LoRTA / one unmerged adapter, throughput, at K distinct adapters
PEFT_FROM = 8  # mixed LoRTA faster than PEFT's mixed LoRA from this many distinct adapters up
PEFT_SPEC = "peft==0.21.2"
# PEFT's targets on Hugging Face ESM: the attention's q, k, v and output projections only (`output.dense` alone
# would also match the MLP's second Linear, and `dense` the LM head's)
PEFT_TARGETS = r".*\.attention\.(self\.(query|key|value)|output\.dense)"

FLOOR = "floor: LoRTA r=8 merged"
SINGLE = "LoRTA r=8 unmerged, one adapter"
HF_BASE = "base, no adapter"
MIXED = "ours mixed LoRTA r=8"
SPLIT = "split by adapter, LoRTA r=8"
HF_MIXED = "ours mixed LoRTA r=8, HF ESM"
FAIR, HF = "fair-esm ESM2", "HF EsmForMaskedLM"


def lora_name(rank: int) -> str:
    return f"ours mixed LoRA r={rank}"


def peft_name(rank: int) -> str:
    return f"PEFT mixed LoRA r={rank}"


def cell(name: str, k: int) -> str:
    return f"{name} @{k}"


def mixed_variants(with_hf: bool, with_peft: bool) -> list:
    """(variant, model) of the variants measured at every K, in table order."""
    out = [(MIXED, FAIR), (SPLIT, FAIR)] + [(lora_name(r), FAIR) for r in LORA_RANKS]
    if with_hf:
        out.append((HF_MIXED, HF))
    if with_peft:
        out += [(peft_name(r), HF) for r in LORA_RANKS]
    return out


def import_optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


# --- models and adapters ---------------------------------------------------------------------------

def perturb(params, seed: int, scale: float = 0.3) -> None:
    """Seeded noise on top of the initialisation: every factor nonzero (B starts at zero), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))


def build_fair(layers, d, heads, device, seed):
    model = build_lm(layers, d, heads, device, seed).eval()
    model.requires_grad_(False)
    return model


def lorta_config():
    return LoRTAConfig(rank=RANK, alpha=RANK)


def library(model, config, names, seed: int, keep) -> AdapterSet:
    """Add one adapter per name (seeded nonzero factors) to `model`, make each mixable, and keep in the set only
    the names in `keep` (a mixed library needs only its stacked copies)."""
    for i, name in enumerate(names):
        torch.manual_seed(seed + 1 + i)  # the initialisation too: the same name and seed give the same adapter
        adapter = add_adapter(model, copy.deepcopy(config), name=name, freeze=False)
        perturb(adapter.parameters(), seed + 1 + i)
    aset = get_adapter_set(model)
    for name in names:
        aset.mix(name)
        if name not in keep:
            aset.remove(name)
    return aset


def hf_esm_like(fair, layers, d, heads, device):
    """transformers' EsmForMaskedLM of the fair-esm model's shape, holding its weights (the same function)."""
    from transformers import EsmConfig, EsmForMaskedLM

    from esmfold_peft.fold.model.lm import fair_esm_to_hf_state_dict

    ln = fair.layers[0].self_attn_layer_norm
    config = EsmConfig(vocab_size=fair.alphabet_size, hidden_size=d, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * d, position_embedding_type="rotary",
                       max_position_embeddings=1026, pad_token_id=fair.padding_idx, mask_token_id=fair.mask_idx,
                       token_dropout=fair.token_dropout, emb_layer_norm_before=False, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, layer_norm_eps=getattr(ln, "eps", 1e-5))
    torch.manual_seed(0)
    hf = EsmForMaskedLM(config)
    sd = fair.state_dict()
    weights = {"esm." + k: v for k, v in fair_esm_to_hf_state_dict(sd).items()}
    weights.update({k: v for k, v in sd.items() if k.startswith("lm_head.") and k != "lm_head.weight"})
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.decoder.weight"}:  # the decoder is tied to the embedding
        raise RuntimeError(f"HF ESM weights: missing {missing}, unexpected {unexpected}")
    hf = hf.to(device).eval()
    hf.requires_grad_(False)
    return hf


def peft_library(hf, names, rank: int, layers: int, seed: int):
    """PEFT's LoRA r=`rank`, one adapter per name (`r{rank}_{name}`), on a copy of `hf` whose modules are copies
    and whose parameters are the same tensors (built before our hooks go on `hf`).

    The first adapter comes from `get_peft_model`, the second from `add_adapter`; `add_adapter` walks every
    module of the model (its own adapters' included) several times, so a library of K costs O(K²) (minutes at
    512 adapters on one layer). The others are added as `add_adapter` adds an adapter to a Linear it already
    wraps, `LoraLayer.update_layer` with the same arguments, plus the config under the adapter's name; they
    are checked to have the second adapter's structure."""
    import peft

    twin = copy.deepcopy(hf, {id(p): p for p in hf.parameters()})
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS, lora_dropout=0.0)
    keys = [f"r{rank}_{name}" for name in names]
    with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        model = peft.get_peft_model(twin, copy.deepcopy(config), adapter_name=keys[0])
        if len(keys) > 1:
            model.add_adapter(keys[1], copy.deepcopy(config))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    if len(wrapped) != 4 * layers or not all(".attention." in n for n in wrapped):
        raise RuntimeError(f"PEFT wrapped {len(wrapped)} Linears ({list(wrapped)[:5]}), expected q, k, v, o of "
                           f"{layers} layers")
    for key in keys[2:]:
        cfg = copy.deepcopy(config)
        for path, layer in wrapped.items():
            layer.update_layer(key, rank, lora_alpha=rank, target_name=path, config=cfg)
        model.peft_config[key] = cfg
    if len(keys) > 2:
        def shape(key):
            return [(type(l.lora_A[key]), tuple(l.lora_A[key].weight.shape), tuple(l.lora_B[key].weight.shape),
                     type(l.lora_dropout[key]), l.scaling[key], l.lora_A[key].weight.device) for l in wrapped.values()]
        if shape(keys[-1]) != shape(keys[1]):
            raise RuntimeError(f"PEFT adapter {keys[-1]} differs from {keys[1]}: {shape(keys[-1])[:1]} vs "
                               f"{shape(keys[1])[:1]}")
    perturb([p for n, p in model.named_parameters() if "lora_" in n], seed + 7)
    model.eval()
    return model


def split_by_adapter(model, aset, tokens, names, repr_layers) -> dict:
    """The batch grouped by adapter, each group run as one batch with its adapter active (None: the base model),
    the outputs put back in record order: the fallback of a one-active-adapter API (PEFT's `set_adapter`)."""
    groups = {}
    for b, name in enumerate(names):
        groups.setdefault(name, []).append(b)
    outs, order = [], []
    for name, idx in groups.items():
        rows = torch.tensor(idx, device=tokens.device)
        if name is None:
            with aset.disabled():
                outs.append(model(tokens[rows], repr_layers=repr_layers))
        else:
            aset.set_active(name)
            outs.append(model(tokens[rows], repr_layers=repr_layers))
        order += idx
    back = torch.empty(len(order), dtype=torch.long, device=tokens.device)
    back[torch.tensor(order, device=tokens.device)] = torch.arange(len(order), device=tokens.device)
    return {"logits": torch.cat([o["logits"] for o in outs])[back],
            "representations": {l: torch.cat([o["representations"][l] for o in outs])[back] for l in repr_layers}}


# --- checks ------------------------------------------------------------------------------------------

def _diff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


@torch.no_grad()
def mixed_and_alone(rep, aset, tokens, names, n: int):
    """(`rep` of the mixed batch, `rep` of its first `n` records each run alone with its adapter); `rep(tokens)` is
    the model's last representation."""
    with aset.routed(names):
        mixed = rep(tokens)
    solo = []
    for b in range(n):
        aset.set_active(names[b])
        solo.append(rep(tokens[b:b + 1]))
    return mixed, torch.cat(solo)


def checks(m, tokens, mask, names_of, with_hf, with_peft) -> dict:
    """max |Δ| of the last representation (float32): a mixed batch's first records against each run alone with
    its adapter, split against mixed, merged against unmerged, and the two ESM implementations."""
    last = m["layers"]
    reps = list(range(last + 1))
    n = min(CHECK_RECORDS, tokens.shape[0])

    def fair_rep(model, toks):
        return model(toks, repr_layers=[last])["representations"][last]

    def hf_rep(model, toks, msk, **kw):
        return model(input_ids=toks, attention_mask=msk, output_hidden_states=True, **kw).hidden_states[-1]

    out = {}
    lorta, aset = m["lorta"], m["lorta_set"]
    names = names_of(None)
    with aset.disabled():
        base = fair_rep(lorta, tokens)
    aset.set_active(names[0])
    single = fair_rep(lorta, tokens)
    out["floor (merged) vs one unmerged adapter"] = (_diff(fair_rep(m["floor"], tokens), single), _diff(single, base))
    mixed, solo = mixed_and_alone(lambda toks: fair_rep(lorta, toks), aset, tokens, names, n)
    out[f"{MIXED} vs each record alone"] = (_diff(mixed[:n], solo), _diff(solo, base[:n]))
    split = split_by_adapter(lorta, aset, tokens, names, reps)["representations"][last]
    out[f"{SPLIT} vs {MIXED}"] = (_diff(split, mixed), _diff(split, base))
    for r in LORA_RANKS:
        mixed_r, solo_r = mixed_and_alone(lambda toks, model=m[f"lora{r}"]: fair_rep(model, toks), m[f"lora{r}_set"],
                                          tokens, names, n)
        out[f"{lora_name(r)} vs each record alone"] = (_diff(mixed_r[:n], solo_r), _diff(solo_r, base[:n]))
    if with_hf:
        hf, hset = m["hf"], m["hf_set"]
        with hset.disabled():
            hf_base = hf_rep(hf, tokens, mask)
        out["HF ESM base vs fair-esm base"] = (_diff(hf_base, base), None)
        with hset.routed(names):
            hf_mixed = hf_rep(hf, tokens, mask)
        out[f"{HF_MIXED} vs {MIXED}"] = (_diff(hf_mixed, mixed), _diff(hf_mixed, hf_base))
    if with_peft:
        for r in LORA_RANKS:
            pm = m[f"peft{r}"]
            pnames = names_of(r)
            mixed_p = hf_rep(pm, tokens, mask, adapter_names=pnames)
            solo_p = []
            for b in range(n):
                pm.set_adapter(pnames[b])
                solo_p.append(hf_rep(pm, tokens[b:b + 1], mask[b:b + 1]))
            solo_p = torch.cat(solo_p)
            out[f"{peft_name(r)} vs each record alone"] = (_diff(mixed_p[:n], solo_p), _diff(solo_p, base[:n]))
    scale = float(base.abs().max())
    limit = CHECK_TOLERANCE * max(1.0, scale)
    return {k: {"max_abs_diff": d, "max_abs_change_from_base": c, "max_abs_output": scale, "ok": d <= limit}
            for k, (d, c) in out.items()}


# --- memory ------------------------------------------------------------------------------------------

def mixed_bytes_per_adapter(layout, config, device, count: int = MEMORY_LIBRARY) -> dict:
    """Bytes per adapter of a `MixedAdapters` library of `count` adapters of `config` over `layout`."""
    mixed = MixedAdapters([layout])
    params = factor_bytes = 0
    for i in range(count):
        adapter = build_adapter(config, layout)
        params = sum(p.numel() for p in adapter.parameters())
        factor_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
        mixed.put(f"m{i}", adapter)
    stack = next(iter(mixed.stacks.values()))
    stack.stacked(device)
    per_slot = stack.nbytes() / next(iter(stack.tensors.values())).shape[0]  # the stacks' only copy; slot 0 is the base (zeros)
    allocated = mixed.resident_bytes() / count  # with the slots allocated ahead (stacks double as they grow)
    del mixed, stack
    return {"parameters": params, "factor_bytes": factor_bytes, "stacked_bytes": per_slot,
            "allocated_bytes": allocated, "device_bytes": per_slot, "largest_library_1gib": int(GiB // per_slot)}


def peft_bytes_per_adapter(hf_config, ranks) -> dict:
    import peft
    from transformers import EsmForMaskedLM

    model = EsmForMaskedLM(hf_config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        pm = None
        for r in ranks:
            config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=PEFT_TARGETS, lora_dropout=0.0)
            if pm is None:
                pm = peft.get_peft_model(model, config, adapter_name=f"r{r}")
            else:
                pm.add_adapter(f"r{r}", config)
    out = {}
    for r in ranks:
        ps = [p for n, p in pm.named_parameters() if "lora_" in n and f".r{r}." in n]
        b = sum(p.numel() * p.element_size() for p in ps)
        out[f"PEFT LoRA r={r}"] = {"parameters": sum(p.numel() for p in ps), "factor_bytes": b,
                                   "stacked_bytes": None, "allocated_bytes": None, "device_bytes": b,
                                   "largest_library_1gib": int(GiB // b)}
    del pm, model
    return out


def memory(smoke: bool, fair_layout, device, with_peft: bool) -> dict:
    """Bytes per resident adapter at the full 35M shape (smoke: the tiny model's)."""
    layout = fair_layout if smoke else architecture(ARCH)
    out = {"shape": "tiny" if smoke else ARCH, "layers": layout.n_layers, "d_model": layout.d_model,
           "heads": layout.n_heads, "device": device.type, "library": MEMORY_LIBRARY, "adapters": {}}
    out["adapters"][f"ours LoRTA r={RANK}"] = mixed_bytes_per_adapter(layout, lorta_config(), device)
    for r in LORA_RANKS:
        out["adapters"][f"ours LoRA r={r}"] = mixed_bytes_per_adapter(layout, LoRAConfig(rank=r, alpha=r), device)
    if with_peft:
        from transformers import EsmConfig

        config = EsmConfig(vocab_size=33, hidden_size=layout.d_model, num_hidden_layers=layout.n_layers,
                           num_attention_heads=layout.n_heads, intermediate_size=4 * layout.d_model,
                           position_embedding_type="rotary", max_position_embeddings=1026, pad_token_id=1,
                           mask_token_id=32)
        out["adapters"].update(peft_bytes_per_adapter(config, LORA_RANKS))
    return out


# --- the run -----------------------------------------------------------------------------------------

def build(dims, device, args, ks, with_hf, with_peft) -> dict:
    layers, d, heads = dims
    lib = [f"a{i}" for i in range(max(ks))]
    keep = set(lib[:CHECK_RECORDS])
    m = {"layers": layers}
    t0 = time.time()
    m["floor"] = build_fair(layers, d, heads, device, args.seed)
    library(m["floor"], lorta_config(), lib[:1], args.seed, keep=set(lib[:1]))
    m["floor_set"] = get_adapter_set(m["floor"])
    m["floor_set"].set_active(lib[0])
    m["floor_set"].merge()
    lorta = m["lorta"] = build_fair(layers, d, heads, device, args.seed)
    if with_hf:
        m["hf"] = hf_esm_like(lorta, layers, d, heads, device)  # before the adapters: base weights only
        if with_peft:  # one PEFT model per rank (its forward walks every module of its own library)
            for r in LORA_RANKS:
                m[f"peft{r}"] = peft_library(m["hf"], lib, r, layers, args.seed + 1000 * r)
    m["lorta_set"] = library(lorta, lorta_config(), lib, args.seed, keep=set(lib))  # split needs every adapter
    for r in LORA_RANKS:
        m[f"lora{r}"] = build_fair(layers, d, heads, device, args.seed)
        m[f"lora{r}_set"] = library(m[f"lora{r}"], LoRAConfig(rank=r, alpha=r), lib, args.seed + 1000 * r, keep)
    if with_hf:
        # our hooks on the HF model; its mixed library holds the very adapters of the fair-esm one
        hset = m["hf_set"] = attach(m["hf"])
        if not only_family_differs([m["lorta_set"].layout], [hset.layout]):
            raise RuntimeError(f"HF ESM's layout is not fair-esm's: {hset.layout} vs {m['lorta_set'].layout}")
        for name in lib:
            hset.mix(name, m["lorta_set"].get(name))
    print(f"  built the models and libraries of {len(lib)} adapters in {time.time() - t0:.1f} s", flush=True)
    return m


def make_variants(m, tokens, mask, ks, device, bf16, with_hf, with_peft) -> dict:
    last = m["layers"]
    reps = list(range(last + 1))
    n = tokens.shape[0]
    lorta, aset = m["lorta"], m["lorta_set"]

    def timed(fn):
        def step():
            with torch.no_grad(), autocast(device, bf16):
                fn()
        return step

    def single():
        aset.set_active("a0")
        lorta(tokens, repr_layers=reps)

    def routed(model, s, names):
        def fn():
            with s.routed(names):
                model(tokens, repr_layers=reps)
        return fn

    def hf_fn(names=None):
        def fn():
            if names is None:
                with m["hf_set"].disabled():
                    m["hf"](input_ids=tokens, attention_mask=mask, output_hidden_states=True)
            else:
                with m["hf_set"].routed(names):
                    m["hf"](input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        return fn

    def peft_fn(rank, names):
        def fn():
            m[f"peft{rank}"](input_ids=tokens, attention_mask=mask, output_hidden_states=True, adapter_names=names)
        return fn

    steps = {FLOOR: timed(lambda: m["floor"](tokens, repr_layers=reps)), SINGLE: timed(single)}
    if with_hf:
        steps[HF_BASE] = timed(hf_fn())
    for k in ks:
        names = [f"a{b % k}" for b in range(n)]
        steps[cell(MIXED, k)] = timed(routed(lorta, aset, names))
        steps[cell(SPLIT, k)] = timed(lambda names=names: split_by_adapter(lorta, aset, tokens, names, reps))
        for r in LORA_RANKS:
            steps[cell(lora_name(r), k)] = timed(routed(m[f"lora{r}"], m[f"lora{r}_set"], names))
        if with_hf:
            steps[cell(HF_MIXED, k)] = timed(hf_fn(names))
        if with_peft:
            for r in LORA_RANKS:
                steps[cell(peft_name(r), k)] = timed(peft_fn(r, [f"r{r}_{x}" for x in names]))
    return steps


def measure(times, n: int, name: str, single, floor) -> dict:
    t = times[name]
    return {"seconds_per_batch": summary(t), "wall_seconds_per_batch": summary(times[name + "@wall"]),
            "records_per_s": summary([n / x for x in t]),
            "vs_single": ratio_summary(single, t), "vs_floor": ratio_summary(floor, t)}


def run(args, device, conf, bf16, with_hf, with_peft, ks) -> dict:
    if args.smoke:
        layers, d, heads = SMOKE_ARCH
        full = layers
        _, records, length = SMOKE_DIMS
    else:
        full, d, heads = shape_dims(ARCH)
        layers, records, length = DIMS[device.type]
        layers = layers or full
    layers = args.layers or layers
    records = args.records or records
    length = args.length or length
    if not 1 <= layers <= full or length < 3:
        raise UserError(f"--layers {layers} --length {length}: the shape has 1 to {full} layers, and a record needs at "
                        "least 3 tokens (cls, a residue, eos)")
    if records < max(ks):
        raise UserError(f"{records} records cannot use {max(ks)} distinct adapters: give --records ≥ {max(ks)} "
                        "or fewer --adapters")
    print(f"{ARCH if not args.smoke else 'tiny'}: d={d}, heads={heads}, layers {layers} of {full}; {records} records "
          f"x {length} tokens; library of {max(ks)} adapters; distinct adapters per batch {', '.join(map(str, ks))}; "
          f"HF ESM {'yes' if with_hf else 'no'}, PEFT {'yes' if with_peft else 'no'}", flush=True)
    m = build((layers, d, heads), device, args, ks, with_hf, with_peft)
    tokens = random_tokens(m["lorta"], records, length, device, args.seed)
    mask = torch.ones_like(tokens)

    def names_of(rank, k=max(ks)):
        return [(f"r{rank}_a{b % k}" if rank else f"a{b % k}") for b in range(records)]

    check = checks(m, tokens, mask, names_of, with_hf, with_peft)
    for name, c in check.items():
        moved = "" if c["max_abs_change_from_base"] is None else f" (moves by {c['max_abs_change_from_base']:.2e})"
        print(f"  check {name}: max |Δ| {c['max_abs_diff']:.2e}{moved}", flush=True)
    wrong = [name for name, c in check.items() if not c["ok"]]
    if wrong:
        raise RuntimeError(f"these variants do not compute the same function: {'; '.join(wrong)} (max |Δ| above "
                           f"{CHECK_TOLERANCE:g} × max(1, max |output|)); their timings would compare different work")
    steps = make_variants(m, tokens, mask, ks, device, bf16, with_hf, with_peft)
    gc.collect()
    gc.freeze()  # the thousands of adapter modules: every gc.collect() between measurements would walk them
    times = interleaved(steps, conf["repeats"], conf["steps"], device, warmup=conf["warmup"], seed=args.seed,
                        best_of=conf.get("best_of", 1))
    gc.unfreeze()
    single, floor = times[SINGLE], times[FLOOR]
    refs = {name: measure(times, records, name, single, floor) for name in (FLOOR, SINGLE, HF_BASE) if name in times}
    mixed = {name: {str(k): measure(times, records, cell(name, k), single, floor) for k in ks}
             for name, _ in mixed_variants(with_hf, with_peft)}
    ratios = {}
    for k in ks:
        q = {}
        if with_peft:
            for r in LORA_RANKS:  # throughput ours / PEFT's = PEFT's seconds / ours
                if with_hf:
                    q[f"{HF_MIXED} / {peft_name(r)}"] = ratio_summary(times[cell(peft_name(r), k)],
                                                                      times[cell(HF_MIXED, k)])
                q[f"{MIXED} / {peft_name(r)}"] = ratio_summary(times[cell(peft_name(r), k)], times[cell(MIXED, k)])
        ratios[str(k)] = q
    if with_hf:
        ratios["HF base / floor"] = ratio_summary(floor, times[HF_BASE])
    result = {"architecture": ARCH if not args.smoke else "tiny", "layers": layers, "layers_full": full, "d_model": d,
              "heads": heads, "records": records, "length": length, "bf16": bf16, "adapters": list(ks),
              "library": max(ks), "references": refs, "mixed": mixed,
              "models": dict(mixed_variants(with_hf, with_peft)), "ratios": ratios, "checks": check}
    result["memory"] = memory(args.smoke, m["lorta_set"].layout, device, with_peft)
    del m, steps
    return result


# --- tables --------------------------------------------------------------------------------------

def fmt_rate(s: dict) -> str:
    f = (lambda x: f"{x:,.0f}") if s["median"] >= 100 else (lambda x: f"{x:.1f}")
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def fmt_bytes(b) -> str:
    if b is None:
        return "–"
    if b >= 2 ** 20:
        return f"{b / 2 ** 20:,.2f} MiB"
    return f"{b / 2 ** 10:,.1f} KiB"


def tables(r: dict, conf: dict, device, peft_version, skipped: list) -> list:
    ks = r["adapters"]
    shape = (f"{r['architecture']} shape (d={r['d_model']}, {r['heads']} heads), {r['layers']} of its "
             f"{r['layers_full']} layers, {r['records']} records × {r['length']} tokens")
    prec = "bf16 autocast" if r["bf16"] else "float32"
    runs = (f"{conf['repeats']} interleaved rounds of {conf['steps']} batch(es) after {conf['warmup']} warm-up; "
            f"{prec}, eval mode, no gradient")
    refs = r["references"]
    t1 = {"title": "Mixed adapters, references: the same batch with one adapter (records/s, median (min–max))",
          "columns": ["variant", "model", "records/s", "× one unmerged adapter"],
          "rows": [[name, HF if name == HF_BASE else FAIR, fmt_rate(v["records_per_s"]),
                    "1" if name == SINGLE else fmt_ratio(v["vs_single"])] for name, v in refs.items()],
          "notes": [f"{shape}; {runs}. × one unmerged adapter: its seconds per batch over the variant's, per round "
                    "(a throughput ratio). The floor is the adapter merged into the weights (the base model's cost)."]}
    rows = [[name, r["models"][name], *(fmt_rate(v[str(k)]["records_per_s"]) for k in ks)]
            for name, v in r["mixed"].items()]
    notes = [f"{shape}. The library holds {r['library']} resident adapters of each kind (seeded nonzero factors); in "
             "the column K, record b uses adapter b mod K, so the batch uses exactly K distinct adapters. Split: one "
             "forward per distinct adapter on its records, outputs put back in order. HF ESM: transformers' "
             f"EsmForMaskedLM with the same weights; PEFT: {('peft ' + peft_version) if peft_version else 'not run'}, "
             "`adapter_names=` per record, LoRA on attention q, k, v, o. LoRA r=1 is the LoRA with the fewest "
             "parameters (about 10× LoRTA r=8's at the 35M shape; no rank has equal parameters), r=8 the equal rank."]
    notes += [f"Left out: {s}." for s in skipped]
    t2 = {"title": "Mixed adapters: records/s by distinct adapters per batch (median, min–max)",
          "columns": ["variant", "model", *(f"K={k}" for k in ks)], "rows": rows, "notes": notes}
    cols = ["K distinct", "mixed LoRTA ÷ one unmerged", "mixed LoRTA ÷ floor", "split ÷ one unmerged",
            *(f"ours mixed LoRA r={x} ÷ one unmerged LoRTA" for x in LORA_RANKS)]
    peft_cols = [f"{HF_MIXED} / {peft_name(x)}" for x in LORA_RANKS]
    have_peft = any(c in r["ratios"][str(ks[0])] for c in peft_cols)
    if have_peft:
        cols += [f"HF: ours mixed LoRTA ÷ PEFT LoRA r={x}" for x in LORA_RANKS]
    rows3 = []
    for k in ks:
        mx = r["mixed"]
        row = [str(k), fmt_ratio(mx[MIXED][str(k)]["vs_single"]), fmt_ratio(mx[MIXED][str(k)]["vs_floor"]),
               fmt_ratio(mx[SPLIT][str(k)]["vs_single"]),
               *(fmt_ratio(mx[lora_name(x)][str(k)]["vs_single"]) for x in LORA_RANKS)]
        if have_peft:
            row += [fmt_ratio(r["ratios"][str(k)][c]) for c in peft_cols]
        rows3.append(row)
    t3 = {"title": "Mixed adapters: throughput ratios (median of per-round ratios, min–max)",
          "columns": cols, "rows": rows3,
          "notes": ["A ratio > 1 is faster. Goals: mixed LoRTA ≥ 0.8× one unmerged adapter at 64 distinct adapters "
                    "and ≥ 0.6× at 512; faster than PEFT's mixed LoRA from 8 distinct adapters up (HF columns: ours "
                    "and PEFT's adapters on the same Hugging Face ESM model)."]}
    rows4 = [[name, f"{c['max_abs_diff']:.1e}",
              "–" if c["max_abs_change_from_base"] is None else f"{c['max_abs_change_from_base']:.1e}"]
             for name, c in r["checks"].items()]
    t4 = {"title": "Mixed adapters: the same function (max |Δ| of the last representation, float32)",
          "columns": ["comparison", "max |Δ|", "max |adapted − base|"], "rows": rows4,
          "notes": [f"At K={max(ks)}, the first {CHECK_RECORDS} records of the mixed batch against each record run "
                    "alone with its adapter active (PEFT: `set_adapter`); split and HF ESM over the whole batch. The "
                    f"script stops when a max |Δ| exceeds {CHECK_TOLERANCE:g} × max(1, max |output|)."]}
    mem = r["memory"]
    where = "host memory" if mem["device"] == "cpu" else "GPU memory"
    rows5 = [[name, f"{a['parameters']:,}", fmt_bytes(a["factor_bytes"]), fmt_bytes(a["device_bytes"]),
              fmt_bytes(a.get("allocated_bytes")), f"{a['largest_library_1gib']:,}"]
             for name, a in mem["adapters"].items()]
    t5 = {"title": f"Mixed adapters: resident bytes per adapter ({mem['shape']}, all {mem['layers']} layers)",
          "columns": ["adapter", "parameters", "factors (float32)", f"resident per adapter ({where})",
                      f"ours: allocated per adapter, {mem['library']} held", "largest library in 1 GiB"],
          "rows": rows5,
          "notes": [f"Ours: a `MixedAdapters` library of {mem['library']} adapters keeps one copy of each "
                    "adapter's factors, in the stacked tensors the gathered forward reads (per slot; LoRTA's C_M "
                    "padded to q, k, v, o; slot 0 is the base). The stacks double their slots as they grow, so up to "
                    "twice the slots in use are allocated (the 'allocated' column). PEFT: the adapter's lora_A and "
                    "lora_B parameters (its modules' Python objects not counted). Largest library: 1 GiB over the "
                    "resident bytes per adapter."]}
    return [t1, t2, t3, t4, t5]


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def verdict_faster(s: dict) -> str:
    """A throughput ratio summary against "faster" (> 1): met only when every round was faster."""
    if s["min"] > 1.0:
        return "met"
    if s["median"] > 1.0:
        return "median faster, not resolved (some rounds slower)"
    return verdict_above(s, 1.0)


def verdict_above(s: dict, target: float) -> str:
    """A throughput ratio summary (median, min, max) against a lower target."""
    if s["median"] >= target:
        return "met"
    if s["max"] >= target:
        return "not resolved (median below, spread includes the target)"
    return "missed"


def trend(values: dict, digits: int = 2) -> str:
    """How a median ratio moves over K: 'falls from a (K=k0) to b (K=k1)', 'rises …' or 'stays at …'."""
    ks = list(values)
    first, last = values[ks[0]], values[ks[-1]]
    if len(ks) == 1:
        return f"is {first:.{digits}f} at K={ks[0]}"
    if abs(last - first) <= 0.03:
        return f"stays at {span(list(values.values()), digits)}"
    word = "falls" if last < first else "rises"
    return f"{word} from {first:.{digits}f} at K={ks[0]} to {last:.{digits}f} at K={ks[-1]}"


def read_mixed_adapters(d: dict) -> tuple[list, str]:
    r = d["result"]
    ks = r["adapters"]
    mixed = r["mixed"]
    vs = {k: mixed[MIXED][str(k)]["vs_single"] for k in ks}
    med = {k: q["median"] for k, q in vs.items()}
    k0 = ks[0]
    targets, lines = [], []
    lines.append(
        f"*What ran.* One batch of {r['records']} records × {r['length']} tokens through {r['layers']} of the "
        f"{r['layers_full']} layers of the {r['architecture']} shape (its width and heads), every layer's "
        f"representation and the LM head as ESMFold asks; a library of {r['library']} resident adapters per method, "
        "and in the cell K record b uses adapter b mod K: exactly K distinct adapters per batch.")
    lines.append(
        f"*Ours, gathered.* Mixed LoRTA r=8's throughput over the single unmerged adapter's {trend(med)}; over "
        "the merged floor's "
        f"{trend({k: mixed[MIXED][str(k)]['vs_floor']['median'] for k in ks})}. Its work per record does not depend "
        "on K: every adapted projection gathers each record's factors by slot id (A, d×r, and the per-head factor, "
        "r×d) and runs per-record batched products (bmm), so K=1 already pays the gather; only the library's "
        "resident bytes grow with K. Ours mixed LoRA over the unmerged LoRTA adapter: "
        + "; ".join(f"r={x} {trend({k: mixed[lora_name(x)][str(k)]['vs_single']['median'] for k in ks})}"
                    for x in LORA_RANKS) + " (a gathered d×r and r×d pair per matrix and record).")
    for k, goal in GOALS:
        if k in vs:
            targets.append([f"mixed LoRTA r=8 / one unmerged adapter, throughput, {k} distinct adapters per batch",
                            f"≥ {goal}", fmt_ratio(vs[k]), verdict_above(vs[k], goal)])
    missed = [(k, goal) for k, goal in GOALS if k in vs and med[k] < goal]
    if missed:
        k1 = missed[0][0]
        lines.append(
            "*Where the goal is missed.* "
            + "; ".join(f"at K={k} the median is {med[k]:.2f} against {goal}" for k, goal in missed) + ". "
            + (f"The ratio at K={k0} ({med[k0]:.2f}, every record with the same adapter) is about the same, so what "
               "bounds it is the per-record path itself, not the number of adapters: gathering N copies of the "
               "factors and running N small products per projection instead of one thin product over all N·T "
               "tokens."
               if abs(med[k1] - med[k0]) <= 0.05 else
               f"It falls from {med[k0]:.2f} at K={k0}, where every record uses the same adapter: with more distinct "
               "slots the gathers read more of the stacked library (fewer cache hits), on top of the per-record "
               "path's own cost."))
    elif any(k in vs for k, _ in GOALS):
        lines.append("The goals measured here are met: " + "; ".join(
            f"{med[k]:.2f} ≥ {goal} at K={k}" for k, goal in GOALS if k in vs) + ".")
    if not all(k in vs for k, _ in GOALS):
        lines.append(f"The goals are stated at {' and '.join(str(k) for k, _ in GOALS)} distinct adapters; this run "
                     f"measured K = {', '.join(map(str, ks))}.")
    split = {k: mixed[SPLIT][str(k)]["vs_single"]["median"] for k in ks}
    lines.append(
        "*Split by adapter* (one forward per distinct adapter on its records): its throughput over the single "
        f"adapter's {trend(split)}. With K groups each forward gets N/K records, so the products shrink and the "
        "per-forward costs (Python, every layer's dispatch of its ops) are paid K times.")
    peft_keys = [(x, f"{HF_MIXED} / {peft_name(x)}") for x in LORA_RANKS]
    if not d.get("peft"):
        lines.append("*PEFT.* This run left out " + "; ".join(d.get("skipped") or ["PEFT's variants"])
                     + ", so it has no comparison with PEFT's mixed LoRA.")
    else:
        big = [k for k in ks if k >= PEFT_FROM]
        for x, key in peft_keys:
            if big:
                qs = [r["ratios"][str(k)][key] for k in big]
                verdicts = [verdict_faster(q) for q in qs]
                worst = next((v for v in verdicts if v == "missed"), next((v for v in verdicts if v != "met"), "met"))
                targets.append([f"mixed LoRTA r=8 / PEFT mixed LoRA r={x}, throughput, K ≥ {PEFT_FROM} (same HF ESM)",
                                "> 1", "; ".join(f"K={k} {fmt_ratio(q)}" for k, q in zip(big, qs)), worst])
        base = r["ratios"].get("HF base / floor")
        lines.append(
            f"*PEFT {d['peft']}.* Its mixed batch loops, at every adapted Linear, over the batch's distinct adapters "
            "(`_mixed_batch_forward`: a sub-batch gather, the adapter's two Linears and a scatter-add each), so its "
            "Python work grows with K while the arithmetic stays that of one adapter. Its throughput over the "
            "unmerged LoRTA adapter's: "
            + "; ".join(f"r={x} {trend({k: mixed[peft_name(x)][str(k)]['vs_single']['median'] for k in ks})}"
                        for x in LORA_RANKS)
            + ". Ours mixed LoRTA over PEFT's mixed LoRA, both on the same HF ESM model: "
            + "; ".join(f"r={x} {trend({k: r['ratios'][str(k)][key]['median'] for k in ks})}" for x, key in peft_keys)
            + ". Ours on fair-esm's ESM2 over PEFT's on HF ESM: "
            + "; ".join(f"r={x} {trend({k: r['ratios'][str(k)][f'{MIXED} / {peft_name(x)}']['median'] for k in ks})}"
                        for x in LORA_RANKS)
            + (f" (the two base models compute the same function; HF ESM's base runs at {fmt_ratio(base)}× the "
               "fair-esm floor's throughput)" if base else "") + "."
            + ("" if big else f" The PEFT goal is stated from {PEFT_FROM} distinct adapters up; this run has no such "
               "cell.")
            + (" On a CPU both gathered paths are bound by the same per-record arithmetic (attention and the "
               "products of one layer), and PEFT's loop over distinct adapters costs little beside it, so the "
               "margins are small; that loop's cost is in kernel launches, which a GPU run (`make bench-gpu`) "
               "measures." if not d.get("machine", {}).get("gpu") else ""))
    mem = r["memory"]
    a = mem["adapters"]
    lorta, lora8 = a[f"ours LoRTA r={RANK}"], a["ours LoRA r=8"]
    where = "host memory" if mem["device"] == "cpu" else "GPU memory"
    lines.append(
        f"*Memory ({mem['shape']}, all {mem['layers']} layers).* In our library a resident LoRTA r=8 adapter holds "
        f"{fmt_bytes(lorta['device_bytes'])} of {where}, LoRA r=8 {fmt_bytes(lora8['device_bytes'])} "
        f"({lora8['device_bytes'] / lorta['device_bytes']:,.0f}×): {lorta['largest_library_1gib']:,} LoRTA r=8 or "
        f"{lora8['largest_library_1gib']:,} LoRA r=8 adapters fit in 1 GiB"
        + (f" (PEFT's LoRA r=8: {a['PEFT LoRA r=8']['largest_library_1gib']:,}, counting its parameters only)"
           if "PEFT LoRA r=8" in a else "")
        + ".")
    checks_ = r["checks"]
    worst = max(checks_.items(), key=lambda kv: kv[1]["max_abs_diff"])
    moved = max(c["max_abs_change_from_base"] or 0 for c in checks_.values())
    ok = all(c.get("ok", True) for c in checks_.values())
    lines.append(
        "*Checks.* " + ("Every compared pair computes the same function to float rounding" if ok else
                        "NOT every compared pair computes the same function")
        + f": the largest max |Δ| is {worst[1]['max_abs_diff']:.1e} ({worst[0]}), while the adapters move the "
        f"output by up to {moved:.1e}.")
    return targets, "\n\n".join(lines)


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "mixed_adapters": ("11. Many adapters, one model: mixed-adapter batches", read_mixed_adapters),
}


def _main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--adapters", default="", help="distinct adapters per batch, comma-separated (default "
                   + ",".join(map(str, ADAPTERS)) + "; smoke " + ",".join(map(str, SMOKE_ADAPTERS)) + ")")
    p.add_argument("--records", type=int, default=0, help="records per batch (0: the device's default)")
    p.add_argument("--length", type=int, default=0, help="tokens per record, cls and eos included (0: default)")
    p.add_argument("--layers", type=int, default=0, help="layers of the shape to run (0: the device's default)")
    p.add_argument("--steps", type=int, default=0, help="batches per timed measurement (0: the device's default)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA too")
    p.add_argument("--no-peft", action="store_true", help="leave out PEFT's variants")
    args = p.parse_args(argv)
    skipped = []
    transformers = import_optional("transformers")
    peft = None if args.no_peft else import_optional("peft")
    if transformers is None:
        skipped.append("the Hugging Face ESM variants and PEFT (transformers is not installed)")
    elif args.no_peft:
        skipped.append("PEFT's variants (--no-peft)")
    elif peft is None:
        skipped.append(f"PEFT's variants (peft is not installed: pip install {PEFT_SPEC})")
    for s in skipped:
        print(f"note: left out {s}", flush=True)
    with_hf, with_peft = transformers is not None, transformers is not None and peft is not None
    try:
        ks = tuple(sorted({int(x) for x in args.adapters.split(",") if x.strip()})) if args.adapters else \
            (SMOKE_ADAPTERS if args.smoke else ADAPTERS)
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise UserError(f"--adapters {args.adapters!r}: give positive whole numbers separated by commas, e.g. 1,8,64")
    gc.freeze()  # the libraries' objects (see nlp_adapter_step.py)
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    conf = run_conf(args, DEFAULTS[device.type], smoke=SMOKE_RUNS)
    bf16 = device.type == "cuda" and not args.no_bf16
    result = run(args, device, conf, bf16, with_hf, with_peft, ks)
    peft_version = peft.__version__ if with_peft else None
    finish("mixed_adapters", args, device, started, load_before,
           {"config": conf, "peft": peft_version, "transformers": transformers.__version__ if transformers else None,
            "skipped": skipped, "result": result, "tables": tables(result, conf, device, peft_version, skipped)})
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
