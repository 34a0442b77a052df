"""Benchmark 8: one training step of the NLP harness's models, our LoRTA and LoRA against Hugging Face PEFT's LoRA.

One forward + loss + backward + Adam step on the adapter parameters only, for: the floor (the
frozen model's forward and loss, no gradient), our LoRA and LoRTA (`esmfold_peft.adapters`, forward
hooks) and PEFT's LoRA (`peft.LoraConfig` + `get_peft_model`, which wraps each projection), at
equal rank r = 1 and 8 on the same q, k, v, o projections (read from our attention layout, so both
adapt the very same Linears), alpha = r, no dropout on the adapter. The three shapes are the
harness's models with random weights (costs do not depend on the weights):

* MiniLM: all-MiniLM-L6-v2's BERT config (6 layers, d=384, 12 heads), sequence classification;
* MPNet: transformers' MPNetConfig (mpnet-base: 12 layers, d=768, 12 heads), sequence classification;
* SmolLM2-135M: SmolLM2-135M-Instruct's Llama config (30 layers, d=576, 9 query / 3 key-value heads),
  causal-LM loss.

The harness also trains a classification head (and BERT's pooler); here the head stays frozen in
every variant, so each step costs exactly the adapter's training (the head's cost would be the same
for all variants). Encoders run in train mode (BERT's and MPNet's dropout on, as in fine-tuning).
Our adapters sit on one model (named adapters, one active at a time; the floor runs it with the
adapters disabled); each PEFT rank wraps its own copy of that model whose modules are copies but
whose parameters are the same tensors, so every variant runs the very same base weights. Memory
counts, per variant, the base weights once plus that variant's adapter, its Adam state and the
inputs. Before timing, our LoRA r=8 factors are copied into PEFT's r=8 adapter and both models'
outputs are compared (parity: the same function, to float rounding).

    python bench/nlp_adapter_step.py              # the device's default shapes
    python bench/nlp_adapter_step.py --shapes MiniLM
    python bench/nlp_adapter_step.py --smoke      # tiny BERT and Llama shapes, seconds
    python bench/nlp_adapter_step.py --no-peft    # our variants only (where peft is not installed)

PEFT is not a dependency of this project: `pip install peft` for this benchmark.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
import warnings

import torch

from common import (MiB, autocast, base_parser, finish, fmt_mib, fmt_ms, fmt_ratio, load_average, measure_variants,
                    mib_text, pick_device, ratio_summary, resident_bytes, run_conf, set_threads, span, verdict_at_most,
                    verdict_near, worst_verdict)
from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, add_adapter, detect_layout, get_adapter_set, is_adapter_param
from esmfold_peft.adapters.layouts import FAMILIES, MATRICES
from esmfold_peft.runtime.cli import run_main
from esmfold_peft.runtime.errors import UserError

# The harness's models. MiniLM: the cached all-MiniLM-L6-v2 config.json; SmolLM2: the converted
# SmolLM2-135M-Instruct config.json; MPNet (no registry default in the harness): transformers'
# MPNetConfig defaults, which are mpnet-base's.
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
              pad_token_id=0)
MPNET = dict()
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, intermediate_size=1536, max_position_embeddings=8192, hidden_act="silu",
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               pad_token_id=2)
# name -> (family, loss kind, config fields, {device kind: (layers or None for all, batch, length)})
# CPU: MiniLM at the harness's classification batch (16 × 48 tokens); MPNet and SmolLM2 with a
# smaller batch to stay within a few minutes; every shape at full depth.
SHAPES = {
    "MiniLM": ("bert", "classify", MINILM, {"cpu": (None, 16, 48), "cuda": (None, 32, 128)}),
    "MPNet": ("mpnet", "classify", MPNET, {"cpu": (None, 8, 48), "cuda": (None, 32, 128)}),
    "SmolLM2-135M": ("llama", "causal", SMOLLM2, {"cpu": (None, 2, 128), "cuda": (None, 8, 512)}),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=300,
            max_position_embeddings=64)
SMOKE_SHAPES = {
    "tiny BERT": ("bert", "classify", TINY, {"cpu": (None, 2, 16), "cuda": (None, 2, 16)}),
    "tiny Llama": ("llama", "causal", dict(TINY, num_key_value_heads=2, tie_word_embeddings=True),
                   {"cpu": (None, 2, 16), "cuda": (None, 2, 16)}),
}
RANKS = (1, 8)
FLOOR = "floor"
DEFAULTS = {"cpu": dict(repeats=5, steps=1, warmup=1), "cuda": dict(repeats=10, steps=5, warmup=3)}
PARITY_RANK = 8
PARITY_TOLERANCE = 1e-4  # max abs(ours − PEFT) relative to max abs(output), float32
PEFT_HINT = "pip install peft"


def ours(method: str, rank: int) -> str:
    return f"ours {method} r={rank}"


def peft_name(rank: int) -> str:
    return f"PEFT LoRA r={rank}"


def variant_names(with_peft: bool) -> list:
    names = [FLOOR]
    for r in RANKS:
        names += [ours("LoRA", r), ours("LoRTA", r)] + ([peft_name(r)] if with_peft else [])
    return names


def import_peft():
    """The peft module, or a UserError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"this benchmark compares against Hugging Face PEFT, which is not installed: {PEFT_HINT} "
                        "(or run --no-peft for our variants only)") from None
    return peft


# --- models --------------------------------------------------------------------------------------

def hf_config(family: str, kind: str, fields: dict, layers=None):
    from transformers import BertConfig, LlamaConfig, MPNetConfig

    cls = {"bert": BertConfig, "mpnet": MPNetConfig, "llama": LlamaConfig}[family]
    fields = dict(fields)
    if layers:
        fields["num_hidden_layers"] = layers
    if kind == "classify":
        fields.update(num_labels=2, problem_type="single_label_classification")
    return cls(**fields)


def build_model(config, kind: str, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if kind == "classify" else AutoModelForCausalLM
    model = auto.from_config(config).to(device)
    model.requires_grad_(False)
    return model


def random_inputs(config, kind: str, batch: int, length: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = torch.randint(0, 2, (batch,), generator=g) if kind == "classify" else ids.clone()
    return {k: v.to(device) for k, v in inputs.items()}


def peft_targets(layout) -> list:
    """The q/k/v/o Linears of our layout, as PEFT `target_modules` (paths relative to a layer)."""
    proj = FAMILIES[layout.family].proj
    return sorted({proj[m] for m in MATRICES})


def add_peft_lora(base, layout, rank: int):
    """PEFT's LoRA r on a copy of `base` that shares its parameters (the modules are copies, so
    wrapping them leaves `base` as it was); returns the PeftModel."""
    peft = import_peft()
    twin = copy.deepcopy(base, {id(p): p for p in base.parameters()})
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_targets(layout), lora_dropout=0.0)
    with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.get_peft_model(twin, config)
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    if len(wrapped) != layout.n_layers * len(MATRICES):
        raise RuntimeError(f"PEFT wrapped {len(wrapped)} Linears, expected {layout.n_layers * len(MATRICES)}")
    return model


def peft_module(peft_model, layout, layer: int, matrix: str):
    return peft_model.get_base_model().get_submodule(layout.projection_path(layer, matrix))


@torch.no_grad()
def copy_lora_to_peft(lora, layout, peft_model, adapter: str = "default") -> None:
    """Put our LoRA's factors into PEFT's adapter (A: r×in, B: out×r in both)."""
    for layer in range(layout.n_layers):
        for m in lora.targets:
            mod = peft_module(peft_model, layout, layer, m)
            if abs(mod.scaling[adapter] - lora.config.scale) > 1e-12:
                raise RuntimeError(f"PEFT scaling {mod.scaling[adapter]} != ours {lora.config.scale}")
            mod.lora_A[adapter].weight.copy_(lora.A[lora._key(layer, m)])
            mod.lora_B[adapter].weight.copy_(lora.B[lora._key(layer, m)])


def model_output(model, inputs: dict) -> torch.Tensor:
    """The last layer's hidden states (the head's logits would hide a small difference behind a small head)."""
    out = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    return out.hidden_states[-1]


@torch.no_grad()
def parity(model, adapter_name: str, peft_model, layout, inputs: dict, seed: int) -> dict:
    """Give our LoRA adapter `adapter_name` seeded nonzero factors, copy them into PEFT's adapter, and
    compare the two models' outputs (eval mode) with each other and with the frozen model's."""
    aset = get_adapter_set(model)
    lora = aset.get(adapter_name)
    g = torch.Generator().manual_seed(seed + 1)
    for p in lora.parameters():
        p.copy_((torch.rand(p.shape, generator=g) - 0.5).to(p) * 0.2)
    copy_lora_to_peft(lora, layout, peft_model)
    was = model.training, peft_model.training
    model.eval(), peft_model.eval()
    try:
        before = aset.active
        aset.set_active(adapter_name)
        ours_out = model_output(model, inputs).float()
        with aset.disabled():
            base_out = model_output(model, inputs).float()
        aset.set_active(before)
        theirs = model_output(peft_model, inputs).float()
    finally:
        model.train(was[0]), peft_model.train(was[1])
    scale = float(ours_out.abs().max())
    diff = float((ours_out - theirs).abs().max())
    return {"rank": lora.config.rank, "max_abs_diff_ours_vs_peft": diff,
            "max_abs_change_from_frozen": float((ours_out - base_out).abs().max()), "max_abs_output": scale,
            "ok": diff <= PARITY_TOLERANCE * max(1.0, scale)}


# --- steps ---------------------------------------------------------------------------------------

def make_steps(model, layout, inputs: dict, device, bf16: bool, with_peft: bool, lr: float = 1e-4):
    """{variant: step}, {variant: resident-bytes function}, {variant: trainable parameters}, and the
    PEFT models by rank (built before our adapters go on `model`, so their copies carry no hooks)."""
    peft_models = {r: add_peft_lora(model, layout, r) for r in RANKS} if with_peft else {}
    trainers = {}  # variant -> (module holding its parameters, optimizer, step)
    for r in RANKS:
        for method, cfg in (("LoRA", LoRAConfig(rank=r, alpha=r)), ("LoRTA", LoRTAConfig(rank=r, alpha=r))):
            key = f"{method}{r}"
            adapter = add_adapter(model, cfg, name=key)
            trainers[ours(method, r)] = (adapter, torch.optim.Adam(adapter.parameters(), lr=lr), key)
    aset = get_adapter_set(model)
    base = [p for n, p in model.named_parameters() if not is_adapter_param(n)] + list(model.buffers())

    def floor():
        with torch.no_grad(), aset.disabled(), autocast(device, bf16):
            model(**inputs)

    def train_step(net, opt, key=None):
        """One step of `net` (ours with adapter `key` made active first, or PEFT's model)."""
        def step():
            if key is not None:
                aset.set_active(key)
            with autocast(device, bf16):
                loss = net(**inputs).loss
            loss.float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {FLOOR: floor}
    resident = {FLOOR: lambda: resident_bytes(base, inputs)}
    params = {FLOOR: 0}
    for name, (adapter, opt, key) in trainers.items():
        steps[name] = train_step(model, opt, key)
        resident[name] = lambda adapter=adapter, opt=opt: resident_bytes(base, adapter, opt, inputs)
        params[name] = sum(p.numel() for p in adapter.parameters())
    for r, pm in peft_models.items():
        pm.train(model.training)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=lr)
        name = peft_name(r)
        steps[name] = train_step(pm, opt)
        resident[name] = lambda pm=pm, opt=opt: resident_bytes(pm, opt, inputs)
        params[name] = sum(p.numel() for p in trainable)
    order = variant_names(with_peft)
    return ({n: steps[n] for n in order}, resident, params, peft_models)


def run_shape(label, spec, dims, device, args, conf, bf16, with_peft: bool):
    family, kind, fields, _ = spec
    layers, batch, length = dims
    config = hf_config(family, kind, fields, layers)
    full_layers = hf_config(family, kind, fields).num_hidden_layers
    model = build_model(config, kind, device, args.seed)
    model.train()
    layout = detect_layout(model)
    kv = layout.n_kv_heads
    heads = f"{layout.n_heads}" + (f"/{kv} kv" if kv != layout.n_heads else "")
    print(f"shape {label} ({config.model_type}): d={layout.d_model}, heads {heads}, layers {layout.n_layers} of "
          f"{full_layers}, batch {batch} x length {length}, attention {config._attn_implementation}", flush=True)
    inputs = random_inputs(config, kind, batch, length, device, args.seed)
    steps, resident, params, peft_models = make_steps(model, layout, inputs, device, bf16, with_peft)
    check = None
    if with_peft:
        check = parity(model, f"LoRA{PARITY_RANK}", peft_models[PARITY_RANK], layout, inputs, args.seed)
        print(f"  parity, ours LoRA r={PARITY_RANK} vs PEFT LoRA with the same factors: max abs difference "
              f"{check['max_abs_diff_ours_vs_peft']:.2e} (outputs up to {check['max_abs_output']:.2e}, "
              f"the adapter moves them by up to {check['max_abs_change_from_frozen']:.2e})", flush=True)
        if not check["ok"]:
            raise RuntimeError(f"{label}: ours LoRA and PEFT LoRA differ by {check['max_abs_diff_ours_vs_peft']:.3e}")
        for r in RANKS:
            if params[ours("LoRA", r)] != params[peft_name(r)]:
                raise RuntimeError(f"{label}: LoRA r={r} has {params[ours('LoRA', r)]} parameters here and "
                                   f"{params[peft_name(r)]} in PEFT")
    variants, times = measure_variants(steps, conf, device, resident, params, FLOOR, args.seed)
    ratios = {}
    if with_peft:
        for r in RANKS:
            theirs = variants[peft_name(r)]["above_floor_bytes"]
            for method in ("LoRA", "LoRTA"):
                mine = ours(method, r)
                ratios[f"ours {method}/PEFT LoRA r={r} time"] = ratio_summary(times[mine], times[peft_name(r)])
                ratios[f"ours {method}/PEFT LoRA r={r} memory above floor"] = (
                    variants[mine]["above_floor_bytes"] / theirs if theirs > 0 else None)
    del model, steps, peft_models
    return {"shape": label, "model_type": config.model_type, "task": kind, "d_model": layout.d_model,
            "heads": layout.n_heads, "kv_heads": kv, "layers": layout.n_layers, "layers_full": full_layers,
            "batch": batch, "length": length, "attention": config._attn_implementation, "bf16": bf16,
            "peft_targets": peft_targets(layout), "parity": check, "variants": variants, "ratios": ratios}


# --- tables --------------------------------------------------------------------------------------

def shape_text(r: dict) -> str:
    heads = f"{r['heads']}" + (f"/{r['kv_heads']} kv" if r["kv_heads"] != r["heads"] else "")
    return (f"{r['layers']}/{r['layers_full']} layers, d={r['d_model']}, {heads} heads, "
            f"{r['batch']}×{r['length']}")


def tables(results, device, conf, peft_version) -> list:
    rows = []
    for r in results:
        for name, v in r["variants"].items():
            rows.append([r["shape"], shape_text(r), name, f"{v['trainable_parameters']:,}",
                         fmt_ms(v["seconds_per_step"]),
                         "1" if name == FLOOR else f"{v['vs_floor']['median']:.2f}",
                         fmt_mib(v["peak_bytes"]), "–" if name == FLOOR else fmt_mib(v["above_floor_bytes"])])
    mem_kind = "max_memory_allocated" if device.type == "cuda" else "live tensor bytes (dispatch-mode tracker)"
    prec = "bf16 autocast" if results and results[0]["bf16"] else "float32"
    against = f"peft {peft_version}" if peft_version else "PEFT not run (--no-peft)"
    t1 = {"title": "NLP adapter step: forward + loss + backward + Adam on the adapter (floor: forward and loss, "
                   "no gradient)",
          "columns": ["shape", "layers k/K, width, heads, batch×length", "variant", "trainable params",
                      "ms/step median (min–max)", "× floor", "peak MiB", "above floor MiB"],
          "rows": rows,
          "notes": [f"Random weights from each model's config; {prec}; {against}; q, k, v, o adapted, alpha = r; "
                    "classification head frozen in every variant (the harness trains it too, at equal cost for "
                    f"all); {conf['repeats']} interleaved rounds of {conf['steps']} step(s) after {conf['warmup']} "
                    f"warm-up step(s); layers k/K: k of the model's K layers; peak memory: {mem_kind}, one step "
                    "(base weights once, plus the variant's adapter, Adam state and inputs); × floor: median of "
                    "per-round ratios."]}
    out = [t1]
    if any(r["ratios"] for r in results):
        rows2 = []
        for r in results:
            q = r["ratios"]
            for rank in RANKS:
                mem = [q[f"ours {m}/PEFT LoRA r={rank} memory above floor"] for m in ("LoRA", "LoRTA")]
                rows2.append([r["shape"], str(rank), fmt_ratio(q[f"ours LoRA/PEFT LoRA r={rank} time"]),
                              fmt_ratio(q[f"ours LoRTA/PEFT LoRA r={rank} time"]),
                              *("–" if x is None else f"{x:.3f}" for x in mem)])
        rows3 = [[r["shape"], str(r["parity"]["rank"]), f"{r['parity']['max_abs_diff_ours_vs_peft']:.1e}",
                  f"{r['parity']['max_abs_change_from_frozen']:.1e}", f"{r['parity']['max_abs_output']:.1e}"]
                 for r in results if r["parity"]]
        out.append({"title": "Ours against PEFT LoRA at equal rank (median of per-round ratios, min–max)",
                    "columns": ["shape", "r", "ours LoRA / PEFT LoRA time", "ours LoRTA / PEFT LoRA time",
                                "ours LoRA / PEFT LoRA memory above floor",
                                "ours LoRTA / PEFT LoRA memory above floor"],
                    "rows": rows2,
                    "notes": ["Targets: ours LoRTA / PEFT LoRA time ≤ 1; ours LoRA / PEFT LoRA ≈ 1 (the same "
                              "arithmetic through hooks instead of wrapper modules)."]})
        out.append({"title": "Parity: our LoRA and PEFT's LoRA with the same factor values "
                             "(last hidden states, eval mode)",
                    "columns": ["shape", "r", "max abs(ours − PEFT)", "max abs(adapted − frozen)",
                                "max abs(output)"],
                    "rows": rows3,
                    "notes": [f"Seeded nonzero factors copied from ours into PEFT; the script stops if the "
                              f"difference exceeds {PARITY_TOLERANCE:g} × max(1, max abs(output))."]})
    return out


def _main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma-separated subset of " + ", ".join(SHAPES)
                   + " (smoke: " + ", ".join(SMOKE_SHAPES) + ")")
    p.add_argument("--steps", type=int, default=0, help="steps per timed measurement (0: the device's default)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA too")
    p.add_argument("--no-peft", action="store_true", help="our variants only (no PEFT comparison, no parity check)")
    args = p.parse_args(argv)
    with_peft = not args.no_peft
    peft_version = import_peft().__version__ if with_peft else None
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401 (loaded now)

    gc.freeze()  # the libraries' objects: every gc.collect() between measurements would walk them (~1 s each)
    device = pick_device(args.device)
    set_threads(args, device)
    started, load_before = time.time(), load_average()
    kind = device.type
    conf = run_conf(args, DEFAULTS[kind])
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in shapes]
        if unknown or not wanted:
            raise UserError(f"--shapes {args.shapes!r}: unknown shape(s) {', '.join(unknown) or '(none given)'}; "
                            f"known: {', '.join(shapes)}")
        shapes = {k: shapes[k] for k in wanted}
    bf16 = kind == "cuda" and not args.no_bf16
    results = [run_shape(label, spec, spec[3][kind], device, args, conf, bf16, with_peft)
               for label, spec in shapes.items()]
    finish("nlp_adapter_step", args, device, started, load_before,
           {"config": conf, "peft": peft_version, "transformers": transformers.__version__,
            "ranks": list(RANKS), "results": results, "tables": tables(results, device, conf, peft_version)})
    return 0


# --- its section of BENCHMARKS.md (bench/report.py) --------------------------------------------------

def read_nlp_adapter_step(d: dict) -> tuple[list, str]:
    res, ranks = d["results"], d["ranks"]
    adapted = [v for r in res for n, v in r["variants"].items() if n != "floor"]
    lines = [
        "*Time.* An adapted step adds the backward pass through the frozen model (input gradients) and the "
        "adapter's thin products to the floor's forward pass, so every adapted variant costs "
        f"{span([v['vs_floor']['median'] for v in adapted])}× the floor ("
        + "; ".join(f"{r['shape']} {r['layers']}/{r['layers_full']} layers at {r['batch']}×{r['length']} tokens, "
                    f"{r['attention']} attention" for r in res) + ")."]
    if not d.get("peft"):
        lines.append("PEFT was not run (--no-peft), so this run has no comparison.")
        return [], "\n\n".join(lines)
    targets = []
    for method, aim, verdict in (("LoRTA", "≤ 1", verdict_at_most), ("LoRA", "≈ 1 (within 0.05)", verdict_near)):
        for r in res:
            qs = [r["ratios"][f"ours {method}/PEFT LoRA r={k} time"] for k in ranks]
            targets.append([f"ours {method} / PEFT LoRA step time, {r['shape']}", aim,
                            "; ".join(f"r={k} {fmt_ratio(q)}" for k, q in zip(ranks, qs)), worst_verdict([verdict(q) for q in qs])])

    def ratios(method, what):
        return [r["ratios"][f"ours {method}/PEFT LoRA r={k} {what}"] for r in res for k in ranks]

    times = ratios("LoRA", "time") + ratios("LoRTA", "time")
    near = all(abs(q["median"] - 1) <= 0.1 for q in times)
    lines.append(
        "Ours against PEFT at equal rank, step time (medians of per-round ratios over the shapes and ranks): "
        f"LoRA {span([q['median'] for q in ratios('LoRA', 'time')], 3)}, "
        f"LoRTA {span([q['median'] for q in ratios('LoRTA', 'time')], 3)}; single rounds range from "
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
        f"({span([a / MiB for a in above], 1)} MiB on {big['shape']}), plus its own parameters, gradients and "
        f"Adam state. Ours / PEFT memory above the floor: LoRA {span(mem['LoRA'], 3)}, LoRTA "
        f"{span(mem['LoRTA'], 3)} over the shapes and ranks. On {big['shape']} at r={top} our LoRA keeps "
        + ("exactly what PEFT's keeps: both scale the thin N×r product and keep no scaled copy of Bᵀ"
           if lora_extra == 0 else f"{mib_text(lora_extra)} more than PEFT's")
        + (f", the size of the scaled copies of Bᵀ ({mib_text(b_bytes)}) that the LoRA of this run's code (commit "
           f"{d['machine']['commit']}) kept for backward; lora.py has since scaled the thin N×r product instead, as "
           "PEFT scales its product, which keeps no copy (`make bench-nlp` measures it again)"
           if lora_extra and abs(lora_extra - b_bytes) <= 0.1 * b_bytes else "")
        + ". Our LoRTA keeps "
        f"{mib_text(lorta_less)} less than PEFT's LoRA: {bv[f'ours LoRTA r={top}']['trainable_parameters']:,} "
        f"parameters against {bv[f'PEFT LoRA r={top}']['trainable_parameters']:,}, each with a gradient and two "
        "Adam moments.")
    worst = max(res, key=lambda r: r["parity"]["max_abs_diff_ours_vs_peft"])
    p = worst["parity"]
    moved = span([r["parity"]["max_abs_change_from_frozen"] for r in res], 1)
    lines.append(
        "*Parity.* With the same factor values our LoRA and PEFT's compute the same function: "
        + ("their last hidden states are identical on every shape" if p["max_abs_diff_ours_vs_peft"] == 0 else
           f"the largest difference of the last hidden states is {p['max_abs_diff_ours_vs_peft']:.1e} "
           f"({worst['shape']})")
        + f", while the adapter moves them by up to {moved} from the frozen model's. "
        f"peft {d['peft']}, transformers {d['transformers']}.")
    return targets, "\n\n".join(lines)


REPORT = {  # the JSON this script writes -> (its section of BENCHMARKS.md, the reading of its numbers)
    "nlp_adapter_step": ("8. NLP adapters against Hugging Face PEFT", read_nlp_adapter_step),
}


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
