"""LoRTA's efficient application against the dense CP formula, on three attention families."""

import itertools

import pytest
import torch
from torch.func import functional_call

import tiny_models as tm
from esmfold_peft.adapters import (LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set)
from esmfold_peft.adapters.config import TENSOR_MODES

MODE_VARIANTS = [("heads",), ("heads", "matrices"), ("heads", "layers"), TENSOR_MODES]


def reference_delta(ad, layout, layer, matrix):
    """ΔW (out×in) straight from the CP formula, with its own reading of the factor shapes."""
    cfg = ad.config
    s = cfg.alpha / cfg.rank
    mi = cfg.targets.index(matrix)
    modes = set(cfg.modes)
    A, B, CH = ad.A, ad.B, ad.C_H
    if "layers" not in modes:
        A, B, CH = A[layer], B[layer], CH[layer]
    if "matrices" not in modes:
        A, B, CH = A[mi], B[mi], CH[mi]
    ones = torch.ones(cfg.rank, dtype=A.dtype, device=A.device)
    cl = ones
    if "layers" in modes:
        CL = ad.C_L if "matrices" in modes else ad.C_L[mi]
        cl = CL[layer]
    cm = ones
    if "matrices" in modes:
        CM = ad.C_M if "layers" in modes else ad.C_M[layer]
        cm = CM[mi]
    T = s * torch.einsum("ik,jk,hk,k,k->ijh", A, B, CH, cl, cm)  # d × d_H × H
    d, dh, H = T.shape
    if matrix in ("k", "v") and layout.n_kv_heads != H:
        T = T.reshape(d, dh, layout.n_kv_heads, H // layout.n_kv_heads).mean(-1)
    if matrix == "o":  # heads split the input: ΔW[i, h·d_H + j]
        return T.permute(0, 2, 1).reshape(d, -1)
    return T.permute(2, 1, 0).reshape(-1, d)  # q/k/v: heads split the output: ΔW[h·d_H + j, i]


def randomize(adapter, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def dense_reference_forward(model, toks, ad, layout, targets):
    """The base model with W + ΔW_ref substituted functionally (gradients reach the factors)."""
    aset = get_adapter_set(model)
    params = dict(model.named_parameters())
    for layer in range(layout.n_layers):
        for m in targets:
            name = layout.projection_path(layer, m) + ".weight"
            params[name] = params[name] + reference_delta(ad, layout, layer, m)
    with aset.disabled():
        return _run(model, params, toks)


def _run(model, params, toks):
    return tm.main_output(functional_call(model, params, (toks,)))


@pytest.mark.parametrize("family", list(tm.FAMILIES))
@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("q",), ("k", "v"), ("o",)])
def test_efficient_equals_dense_formula_on_models(family, targets):
    torch.manual_seed(0)
    model = tm.FAMILIES[family]().eval()
    toks = tm.tokens()
    ad = add_adapter(model, LoRTAConfig(rank=3, alpha=6, targets=targets))
    randomize(ad)
    layout = get_adapter_set(model).layout
    got = tm.run(model, toks)
    want = dense_reference_forward(model, toks, ad, layout, targets)
    with get_adapter_set(model).disabled():
        base = tm.run(model, toks)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_gradients_equal_dense_reference(family):
    torch.manual_seed(0)
    model = tm.FAMILIES[family]().eval().double()  # float64: compare gradients tightly
    toks = tm.tokens()
    ad = add_adapter(model, LoRTAConfig(rank=4, alpha=4, dtype="float64"))
    randomize(ad, seed=3, scale=0.5)
    layout = get_adapter_set(model).layout
    probe = torch.randn_like(tm.run(model, toks))
    (tm.run(model, toks) * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in ad.named_parameters()}
    ad.zero_grad()
    (dense_reference_forward(model, toks, ad, layout, ad.targets) * probe).sum().backward()
    for n, p in ad.named_parameters():
        assert got[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {n}")


@pytest.mark.parametrize("modes", MODE_VARIANTS, ids=lambda m: "+".join(m))
@pytest.mark.parametrize("gqa", [False, True])
def test_projection_deltas_all_mode_variants(modes, gqa):
    torch.manual_seed(0)
    model = tm.hf_llama(layers=3, dim=48, heads=6, kv_heads=2 if gqa else 6)
    ad = add_adapter(model, LoRTAConfig(rank=5, alpha=2.5, modes=modes))
    randomize(ad, seed=7)
    layout = get_adapter_set(model).layout
    for layer, m in itertools.product(range(layout.n_layers), "qkvo"):
        out_f, in_f = layout.linear_shape(m)
        x = torch.randn(2, 7, in_f)
        ref = reference_delta(ad, layout, layer, m)
        assert ref.shape == (out_f, in_f)
        torch.testing.assert_close(ad.delta(x, layer, m), x @ ref.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ad.delta_weight(layer, m), ref, rtol=1e-5, atol=1e-6)


def test_head_axis_of_o_is_the_input():
    """o's heads split its input: the transposed (q-style) layout would be a different update."""
    torch.manual_seed(0)
    model = tm.fair_esm2(layers=1, dim=32, heads=4)
    ad = add_adapter(model, LoRTAConfig(rank=2, alpha=2))
    randomize(ad)
    dw_o = ad.delta_weight(0, "o")
    dh, H = 8, 4
    # column block h of ΔW_o must be A diag(w[h]) B^T: every row i scales with A[i]
    w = ad.head_weights(0, "o")
    for h in range(H):
        block = dw_o[:, h * dh:(h + 1) * dh]
        torch.testing.assert_close(block, ad.A @ torch.diag(w[h]) @ ad.B.T)
    wrong = ad.delta_weight(0, "q").T.contiguous()  # what a q-style head axis would give for o
    w_q = ad.head_weights(0, "q")
    assert not torch.allclose(dw_o, ad.A @ (w_q[:, None, :] * ad.B[None]).reshape(-1, 2).T)
    assert not torch.allclose(dw_o, wrong)


def test_qkv_share_one_input_projection():
    torch.manual_seed(0)
    model = tm.fair_esm2(layers=2, dim=32, heads=4)
    ad = add_adapter(model, LoRTAConfig(rank=2, alpha=2))
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[-1])
            return x

    ad.dropout = Counting()
    tm.run(model, tm.tokens())
    # per layer: one projection x A shared by q, k, v, and one for o
    assert len(calls) == 2 * 2


def test_lora_matches_its_formula_and_targets():
    torch.manual_seed(0)
    model = tm.hf_llama(layers=2, dim=48, heads=6, kv_heads=2).eval()
    ad = add_adapter(model, LoRAConfig(rank=3, alpha=9, targets=("q", "v")))
    randomize(ad)
    layout = get_adapter_set(model).layout
    for layer in range(2):
        for m in ("q", "v"):
            key = f"{layer}_{m}"
            torch.testing.assert_close(ad.delta_weight(layer, m), 3.0 * ad.B[key] @ ad.A[key])
    params = dict(model.named_parameters())
    for layer in range(2):
        for m in ("q", "v"):
            name = layout.projection_path(layer, m) + ".weight"
            params[name] = params[name] + ad.delta_weight(layer, m)
    toks = tm.tokens()
    with get_adapter_set(model).disabled():
        want = _run(model, params, toks)
    torch.testing.assert_close(tm.run(model, toks), want, rtol=1e-4, atol=1e-4)
