"""A frozen language model stored in bf16 (model.lm.storage_dtype): half the bytes, float32 adapters, close results.

Error bound for the gradients. bf16 keeps 8 significant bits: round-to-nearest has unit roundoff
u = 2^-9 ≈ 0.002. In a bf16 run the weights are rounded once and, under autocast, every matmul's
inputs and output are rounded again; along the longest path of a 2-layer ESM-2 (embedding, per
layer q/k/v/attention/out-projection/fc1/fc2 in forward and the same in backward) that is about
k = 30 roundings between the input and a factor's gradient. To first order each adds at most u
to the relative error, so |g_bf16 − g_fp32| / |g_fp32| ≤ k·u ≈ 0.06 (independent roundings add in
quadrature, ≈ √k·u ≈ 1 %, which is what is measured: 1–3 %). The tests assert that worst-case
bound, 0.06, per factor, besides cosine similarity > 0.99. The bound only holds for a
well-conditioned loss: with a saturated loss (e.g. tanh far in its tails) the gradient is the
small difference of large terms and bf16 can lose it entirely (so would any low precision).
"""

import copy
import math

import pytest
import torch

from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set
from esmfold_peft.fold.model.build import build_model
from esmfold_peft.fold.model.esm_attention import enable_sdpa
from esmfold_peft.fold.model.lm import LanguageModelError, lm_autocast, set_storage_dtype
from esmfold_peft.fold.train import seed_everything
from fold_fixtures import tiny_run_config
from test_fold_model import forward_loss, tiny_batch

U = 2.0 ** -9  # bf16 unit roundoff
ROUNDINGS = 30  # bf16 roundings on the longest forward + backward path of a 2-layer ESM-2 (module docstring)
REL_BOUND = ROUNDINGS * U  # ≈ 0.06


def tiny_esm2(seed=0):
    import esm

    torch.manual_seed(seed)
    return esm.model.esm2.ESM2(num_layers=2, embed_dim=64, attention_heads=4,
                               alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))


def base_bytes(lm):
    return sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("peft."))


def adapted(config, sdpa, seed=0):
    """A tiny ESM-2, frozen, with an adapter whose factors are all nonzero (B too, so every factor has a gradient)."""
    lm = tiny_esm2(seed)
    if sdpa:
        enable_sdpa(lm)
    lm.requires_grad_(False)
    add_adapter(lm, config, freeze=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in get_adapter_set(lm).get().named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if ".B" in f".{name}" else 0.3))
    return lm


def tokens(batch=2, length=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, 24, (batch, length), generator=g)
    toks[:, 0], toks[:, -1] = 0, 2  # cls, eos
    return toks


def representations_and_grads(lm, toks):
    """All layers' representations (float32) and the adapter's gradients for a well-conditioned loss."""
    with lm_autocast(lm, toks.device.type):
        reps = lm(toks, repr_layers=range(lm.num_layers + 1))["representations"]
    s = torch.stack([reps[i] for i in range(lm.num_layers + 1)], dim=2).float()
    proj = torch.randn(s.shape[2], s.shape[-1], generator=torch.Generator().manual_seed(5))
    loss = ((s * proj).sum(-1) * 0.1).tanh().pow(2).mean()
    loss.backward()
    return s.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_storage_halves_the_base_parameters_and_keeps_adapters_buffers_and_ties():
    lm = tiny_esm2()
    add_adapter(lm, LoRTAConfig(rank=4), freeze=True)
    before = base_bytes(lm)
    adapter_before = {n: p.dtype for n, p in lm.named_parameters() if n.startswith("peft.")}
    assert set_storage_dtype(lm, "bfloat16") == before // 2
    assert base_bytes(lm) * 2 == before  # exactly half: every base parameter is floating point
    for n, p in lm.named_parameters():
        assert p.dtype == (adapter_before[n] if n.startswith("peft.") else torch.bfloat16), n
    assert all(b.dtype == torch.float32 for n, b in lm.named_buffers() if n.endswith("inv_freq"))
    assert lm.lm_head.weight is lm.embed_tokens.weight  # fair-esm ties them; still one tensor
    with pytest.raises(LanguageModelError, match="storage_dtype"):
        set_storage_dtype(lm, "float16")
    assert set_storage_dtype(lm, "float32") == before  # and back


@pytest.mark.parametrize("sdpa", [False, True], ids=["fair-esm-attention", "sdpa"])
@pytest.mark.parametrize("config", [LoRTAConfig(rank=4, alpha=8), LoRAConfig(rank=4, alpha=8)],
                         ids=["lorta", "lora"])
def test_bf16_storage_gives_close_outputs_and_adapter_gradients(config, sdpa):
    ref = adapted(config, sdpa)
    low = copy.deepcopy(ref)
    set_storage_dtype(low, "bfloat16")
    toks = tokens()
    s32, g32 = representations_and_grads(ref, toks)
    s16, g16 = representations_and_grads(low, toks)
    assert rel_err(s16, s32) < 8 * U  # forward only, a few roundings per layer (measured ≈ 2u)
    assert g32.keys() == g16.keys() and g32
    for name in g32:
        assert g16[name].dtype == torch.float32, name  # factors stay float32, so do their gradients
        assert torch.isfinite(g16[name]).all(), name
        assert g32[name].abs().max() > 0, name
        assert cosine(g16[name], g32[name]) > 0.99, name
        assert rel_err(g16[name], g32[name]) < REL_BOUND, (name, rel_err(g16[name], g32[name]))


def test_a_float32_lm_runs_without_autocast():
    lm = tiny_esm2()
    with lm_autocast(lm, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def _fold_model(tmp_path, storage, adapter="lorta"):
    cfg = tiny_run_config(tmp_path, adapter=adapter)  # writes the tiny LM on first use (seeding itself)
    seed_everything(0)  # then the same initialisation for every storage (openfold's uses numpy too)
    cfg.model.trunk.structure_module.dropout_rate = 0.0
    cfg.model.lm.storage_dtype = storage
    model = build_model(cfg)
    if adapter == "lorta":
        with torch.no_grad():  # a nonzero update, as after some training
            model.esm.peft.get().B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model, cfg


def test_folding_model_with_a_bf16_lm_trains_the_adapter_like_float32(tmp_path):
    batch = tiny_batch(tmp_path)
    results = {}
    for storage in ("float32", "bfloat16"):
        model, cfg = _fold_model(tmp_path, storage)
        lm_bytes = base_bytes(model.esm)
        out, (loss, terms) = forward_loss(model, batch, cfg)
        loss.backward()
        grads = {n: p.grad for n, p in model.esm.named_parameters() if n.startswith("peft.")}
        results[storage] = (lm_bytes, out, terms, grads, model)
    b32, out32, terms32, g32, _ = results["float32"]
    b16, out16, terms16, g16, model16 = results["bfloat16"]
    assert b16 * 2 == b32
    assert all(p.dtype == torch.float32 for n, p in model16.named_parameters() if not n.startswith("esm."))
    for key in ("s_s", "s_z", "positions", "plddt"):
        assert out16[key].dtype == torch.float32, key  # the trunk runs in float32
    assert math.isfinite(terms16["loss"]) and abs(terms16["loss"] - terms32["loss"]) < 0.01 * abs(terms32["loss"])
    assert g16.keys() == g32.keys() and g32
    for name in g32:
        assert g16[name].dtype == torch.float32 and torch.isfinite(g16[name]).all(), name
        assert cosine(g16[name], g32[name]) > 0.99, (name, cosine(g16[name], g32[name]))
        # trunk and structure module lie between the LM and the loss: a looser bound than the LM alone
        assert rel_err(g16[name], g32[name]) < 2 * REL_BOUND, (name, rel_err(g16[name], g32[name]))


def test_frozen_lm_and_prediction_run_in_bf16(tmp_path):
    batch = tiny_batch(tmp_path)
    positions = {}
    for storage in ("float32", "bfloat16"):
        model, _ = _fold_model(tmp_path, storage, adapter="none")
        assert not any(p.requires_grad for p in model.esm.parameters())
        with torch.no_grad():
            out = model.eval()(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=1)
        positions[storage] = out["positions"][-1]
    assert torch.isfinite(positions["bfloat16"]).all()
    # random tiny model: only that the structure is the same up to bf16 noise, a few hundredths of an Å
    assert (positions["bfloat16"] - positions["float32"]).abs().max() < 0.5


def test_full_fine_tuning_refuses_a_bf16_lm(tmp_path):
    model, cfg = _fold_model(tmp_path, "bfloat16", adapter="full")
    batch = tiny_batch(tmp_path)
    with pytest.raises(LanguageModelError, match="full fine-tuning"):
        forward_loss(model, batch, cfg)
    with torch.no_grad():  # running it (e.g. a prediction) is fine
        out = model.eval()(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=0)
    assert torch.isfinite(out["positions"]).all()
