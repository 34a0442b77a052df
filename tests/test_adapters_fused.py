"""Adapters on ESMFold's folding trunk: the fused q/k/v sequence attention and the triangle attention.

The trunk is fair-esm's block stack at small widths (its `FoldingTrunk.blocks`): sequence state 64
(4 heads of 16, q/k/v fused in one Linear), pair state 32 (2 heads of 16), two blocks, so
L = 2 for `esmfold-seq` and L = 4 (start, end per block) for `esmfold-tri`.
"""

import dataclasses
import json

import pytest
import torch
from einops import rearrange
from torch import nn
from torch.func import functional_call

import esmfold_peft.compat  # noqa: F401  (fair-esm's trunk modules import only after it)
from esm.esmfold.v1.tri_self_attn_block import TriangularSelfAttentionBlock
from esmfold_peft.adapters import (AdapterError, AdapterLoadError, AttentionLayout, LayoutError, LoRA, LoRAConfig, LoRTA,
                                   LoRTAConfig, add_adapter, architecture, build_adapter, detect_layout,
                                   get_adapter_set, load_adapter, save_adapter, trainable_parameters)
from esmfold_peft.adapters.config import TENSOR_MODES
from esmfold_peft.adapters.inject import AdapterGroup
from test_adapters_math import randomize, reference_delta

TRUNK = ("esmfold-seq", "esmfold-tri")
SEQ, PAIR, HEAD = 64, 32, 16


class TinyTrunk(nn.Module):
    """fair-esm's trunk blocks at small widths, run as FoldingTrunk runs them (no recycling, no heads)."""

    def __init__(self, blocks=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([TriangularSelfAttentionBlock(sequence_state_dim=SEQ, pairwise_state_dim=PAIR,
                                                                  sequence_head_width=HEAD, pairwise_head_width=HEAD,
                                                                  dropout=0) for _ in range(blocks)])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the blocks zero-initialise their output projections, which would hide any update
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.chunk_size = None

    def forward(self, s, z, mask):
        for block in self.blocks:
            s, z = block(s, z, mask=mask, chunk_size=self.chunk_size)
        return torch.cat([s.flatten(), z.flatten()])


def inputs(seed=0, length=6):
    g = torch.Generator().manual_seed(seed)
    s, z = torch.randn(2, length, SEQ, generator=g), torch.randn(2, length, length, PAIR, generator=g)
    mask = torch.ones(2, length)
    mask[1, -1] = 0  # one padded position
    return s, z, mask


def dense_delta(part, layout, layer, matrix):
    """ΔW of one logical matrix straight from the method's formula (zero when not targeted)."""
    if matrix not in part.targets:
        return torch.zeros(*layout.linear_shape(matrix), dtype=part.config.torch_dtype)
    if isinstance(part, LoRA):
        key = f"{layer}_{matrix}"
        return part.config.scale * part.B[key] @ part.A[key]
    return reference_delta(part, layout, layer, matrix)


def fused_weight_delta(part, layout, layer):
    """ΔW of `seq_attention.proj`, rows laid out as fair-esm reads them: `(h c)` with c = (q|k|v)·d_H + j."""
    H, dh, d = layout.n_heads, layout.head_dim, layout.d_model
    per_head = [dense_delta(part, layout, layer, m).view(H, dh, d) for m in "qkv"]
    return torch.stack(per_head, dim=1).reshape(3 * H * dh, d)  # row h·3d_H + p·d_H + j


def dense_reference_forward(trunk, args):
    """The trunk with W + ΔW substituted functionally for every adapted Linear (gradients reach factors)."""
    aset = get_adapter_set(trunk)
    params = dict(trunk.named_parameters())
    for layout in aset.layouts:
        part = aset.part(None, layout.family)
        for layer in range(layout.n_layers):
            if layout.family == "esmfold-seq":
                updates = {"q": fused_weight_delta(part, layout, layer), "o": dense_delta(part, layout, layer, "o")}
            else:
                updates = {m: dense_delta(part, layout, layer, m) for m in "qkvo"}
            for m, dw in updates.items():
                name = layout.projection_path(layer, m) + ".weight"
                params[name] = params[name] + dw
    with aset.disabled():
        return functional_call(trunk, params, args)


# --- layouts ------------------------------------------------------------------------------------------

def test_trunk_families_are_detected_with_their_shapes():
    trunk = TinyTrunk()
    seq, tri = detect_layout(trunk, "esmfold-seq"), detect_layout(trunk, "esmfold-tri")
    assert (seq.n_layers, seq.d_model, seq.n_heads, seq.head_dim) == (2, SEQ, SEQ // HEAD, HEAD)
    assert (tri.n_layers, tri.d_model, tri.n_heads, tri.head_dim) == (4, PAIR, PAIR // HEAD, HEAD)
    assert [seq.projection_path(1, m) for m in "qkvo"] == ["blocks.1.seq_attention.proj"] * 3 + [
        "blocks.1.seq_attention.o_proj"]
    assert seq.groups() == (("seq_attention.proj", ("q", "k", "v")), ("seq_attention.o_proj", ("o",)))
    # triangle layers in model order: l = 2·block + (start 0, end 1)
    assert tri.layer_paths == ("blocks.0.tri_att_start", "blocks.0.tri_att_end",
                               "blocks.1.tri_att_start", "blocks.1.tri_att_end")
    with pytest.raises(LayoutError, match=r"several layouts \(esmfold-seq, esmfold-tri\).*layout=\("):
        detect_layout(trunk)


def test_fuse_interleaves_per_head_on_activations_and_weights():
    H, dh = 4, 3
    layout = AttentionLayout("esmfold-seq", 1, 8, H, dh)
    pieces = {m: torch.randn(5, H * dh) for m in "qv"}  # k not targeted
    fused = layout.fuse(("q", "k", "v"), pieces, dim=-1)
    assert fused.shape == (5, 3 * H * dh)
    for h in range(H):
        for p, m in enumerate("qkv"):
            rows = slice(h * 3 * dh + p * dh, h * 3 * dh + (p + 1) * dh)
            want = pieces[m][:, h * dh:(h + 1) * dh] if m in pieces else torch.zeros(5, dh)
            assert torch.equal(fused[:, rows], want), (h, m)
    weights = {m: torch.randn(H * dh, 8) for m in "qkv"}
    assert torch.equal(layout.fuse(("q", "k", "v"), weights, dim=0).T,
                       layout.fuse(("q", "k", "v"), {m: w.T for m, w in weights.items()}, dim=-1))
    assert layout.fuse(("o",), {"o": weights["q"]}, dim=0) is weights["q"]  # a Linear of its own: unchanged


# --- the efficient path against the dense formula --------------------------------------------------

CONFIGS = {
    "lorta": LoRTAConfig(rank=3, alpha=6),
    "lorta-q": LoRTAConfig(rank=3, alpha=6, targets=("q",)),
    "lorta-kv": LoRTAConfig(rank=2, alpha=1, targets=("k", "v")),
    "lorta-o": LoRTAConfig(rank=2, alpha=3, targets=("o",)),
    "lorta-heads": LoRTAConfig(rank=2, modes="heads"),
    "lorta-heads,layers": LoRTAConfig(rank=2, modes="heads,layers", targets=("q", "v", "o")),
    "lora": LoRAConfig(rank=2, alpha=4),
    "lora-kv": LoRAConfig(rank=2, alpha=4, targets=("k", "v")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("families", [TRUNK, ("esmfold-seq",), ("esmfold-tri",)], ids=["both", "seq", "tri"])
def test_efficient_equals_dense_formula_on_the_trunk(name, families):
    trunk = TinyTrunk().double().eval()  # float64: the two paths agree to rounding, tightly
    args = tuple(a.double() for a in inputs())
    base = trunk(*args).detach()
    add_adapter(trunk, dataclasses.replace(CONFIGS[name], dtype="float64"), layout=families)
    assert torch.equal(trunk(*args), base)  # zero update at initialisation
    randomize(get_adapter_set(trunk).get(), seed=2)
    got = trunk(*args)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, dense_reference_forward(trunk, args), rtol=1e-9, atol=1e-9)


def test_gradients_equal_dense_reference_on_the_trunk():
    trunk = TinyTrunk().double().eval()
    args = tuple(a.double() for a in inputs())
    ad = add_adapter(trunk, LoRTAConfig(rank=3, alpha=3, dtype="float64"), layout=TRUNK)
    randomize(ad, seed=4, scale=0.3)
    probe = torch.randn_like(trunk(*args))
    (trunk(*args) * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in ad.named_parameters()}
    ad.zero_grad()
    (dense_reference_forward(trunk, args) * probe).sum().backward()
    for n, p in ad.named_parameters():
        assert got[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {n}")


def test_chunked_triangle_attention_gives_the_same_update():
    trunk = TinyTrunk().eval()
    args = inputs(length=7)
    randomize(add_adapter(trunk, LoRTAConfig(rank=2), layout=TRUNK), seed=5, scale=0.3)
    whole = trunk(*args)
    trunk.chunk_size = 3  # openfold slices q_x and kv_x separately: no shared x·A, same result
    torch.testing.assert_close(trunk(*args), whole, rtol=1e-5, atol=1e-5)


def test_qkv_share_one_input_projection_per_layer():
    trunk = TinyTrunk().eval()
    group = add_adapter(trunk, LoRTAConfig(rank=2), layout=TRUNK)
    calls = {f: 0 for f in TRUNK}

    class Counting(nn.Module):
        def __init__(self, family):
            super().__init__()
            self.family = family

        def forward(self, x):
            calls[self.family] += 1
            return x

    for family in TRUNK:
        group[family].dropout = Counting(family)
    trunk(*inputs())
    # per layer one x·A for the fused q/k/v (or the three separate q/k/v on one x) and one for o
    assert calls == {"esmfold-seq": 2 * 2, "esmfold-tri": 4 * 2}


# --- the head axis on the fused layout ----------------------------------------------------------------

def test_fused_rows_are_fair_esm_q_k_v_per_head():
    """Through fair-esm's own split of `proj(x)`: Δq, Δk, Δv are x ΔW_{q,k,v}ᵀ with heads on the output."""
    trunk = TinyTrunk().eval()
    group = add_adapter(trunk, LoRTAConfig(rank=3), layout="esmfold-seq")
    randomize(group, seed=6)
    layout = get_adapter_set(trunk).layout
    attn = trunk.blocks[1].seq_attention
    x = torch.randn(2, 5, SEQ)

    def split(y):  # exactly Attention.forward's reading of proj(x)
        return rearrange(y, "... l (h c) -> ... h l c", h=attn.num_heads).chunk(3, dim=-1)

    with get_adapter_set(trunk).disabled():
        base = split(attn.proj(x))
    adapted = split(attn.proj(x))
    for m, b, a in zip("qkv", base, adapted):
        want = rearrange(x @ reference_delta(group, layout, 1, m).T, "... l (h c) -> ... h l c", h=attn.num_heads)
        torch.testing.assert_close(a - b, want, rtol=1e-4, atol=1e-5, msg=m)


def test_head_axes_on_the_fused_weight():
    """q/k/v: head h of part p owns fused rows (h·3 + p)·d_H …; o: head h owns input columns h·d_H …"""
    trunk = TinyTrunk().eval()
    ad = add_adapter(trunk, LoRTAConfig(rank=2), layout="esmfold-seq")
    randomize(ad, seed=8)
    aset = get_adapter_set(trunk)
    H, dh = SEQ // HEAD, HEAD
    proj, o_proj = trunk.blocks[0].seq_attention.proj, trunk.blocks[0].seq_attention.o_proj
    before_qkv, before_o = proj.weight.detach().clone(), o_proj.weight.detach().clone()
    aset.merge()
    dw_qkv, dw_o = proj.weight.detach() - before_qkv, o_proj.weight.detach() - before_o
    for h in range(H):
        for p, m in enumerate("qkv"):
            w = ad.head_weights(0, m)[h]
            rows = dw_qkv[(h * 3 + p) * dh:(h * 3 + p + 1) * dh]
            torch.testing.assert_close(rows, ad.B @ torch.diag(w) @ ad.A.T, rtol=1e-4, atol=1e-5)
        cols = dw_o[:, h * dh:(h + 1) * dh]
        torch.testing.assert_close(cols, ad.A @ torch.diag(ad.head_weights(0, "o")[h]) @ ad.B.T, rtol=1e-4, atol=1e-5)
    # the q rows laid out without the interleave (q block first) would be another update
    assert not torch.allclose(dw_qkv[:H * dh], ad.delta_weight(0, "q"), atol=1e-4)


def test_one_head_of_c_h_touches_only_that_heads_rows():
    trunk = TinyTrunk().eval()
    ad = add_adapter(trunk, LoRTAConfig(rank=2), layout="esmfold-seq")
    randomize(ad, seed=9)
    with torch.no_grad():
        ad.C_H[[0, 1, 3]] = 0  # only head 2 left
    proj = trunk.blocks[0].seq_attention.proj
    x = torch.randn(3, SEQ)
    with get_adapter_set(trunk).disabled():
        base = proj(x)
    delta = (proj(x) - base).view(3, SEQ // HEAD, 3 * HEAD)
    assert delta[:, 2].abs().min() > 0 and delta[:, [0, 1, 3]].abs().max() < 1e-6


# --- merging, saving, loading, counting -------------------------------------------------------------

@pytest.mark.parametrize("name", ["lorta", "lorta-kv", "lora"])
def test_merge_unmerge_round_trip_on_the_trunk(name):
    trunk = TinyTrunk().eval()
    args = inputs()
    randomize(add_adapter(trunk, CONFIGS[name], layout=TRUNK), seed=3, scale=0.3)
    weights = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    adapted = trunk(*args).detach()
    aset = get_adapter_set(trunk)
    aset.merge()
    assert not any(m._forward_hooks for m in trunk.modules())
    torch.testing.assert_close(trunk(*args), adapted, rtol=1e-4, atol=1e-4)
    proj = trunk.blocks[0].seq_attention.proj.weight.detach().view(SEQ // HEAD, 3, HEAD, SEQ)
    before = weights["blocks.0.seq_attention.proj.weight"].view(SEQ // HEAD, 3, HEAD, SEQ)
    for p, m in enumerate("qkv"):  # only the targeted parts' rows of the fused weight moved
        assert torch.equal(proj[:, p], before[:, p]) == (m not in CONFIGS[name].targets), m
    aset.unmerge()
    for n, p in trunk.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(trunk(*args), adapted, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_of_a_trunk_adapter(tmp_path):
    from safetensors.torch import load_file

    trunk = TinyTrunk().eval()
    args = inputs()
    ad = add_adapter(trunk, LoRTAConfig(rank=4, alpha=8), layout=TRUNK)
    randomize(ad, seed=1, scale=0.3)
    want = trunk(*args).detach()
    save_adapter(trunk, tmp_path / "trunk")
    meta = json.loads((tmp_path / "trunk" / "adapter_config.json").read_text())
    assert meta["format_version"] == 2 and "layout" not in meta
    assert [l["family"] for l in meta["layouts"]] == list(TRUNK)
    names = set(load_file(str(tmp_path / "trunk" / "adapter_model.safetensors")))
    assert names == {f"{f}.lorta.{t}" for f in TRUNK for t in ("A", "B", "C_H", "C_L", "C_M")}

    fresh = TinyTrunk().eval()  # same base weights (same seed); its two families are found from the file
    loaded = load_adapter(fresh, tmp_path / "trunk")
    assert isinstance(loaded, AdapterGroup) and torch.equal(fresh(*args), want)
    assert trainable_parameters(fresh) == sum(p.numel() for p in ad.parameters())

    with pytest.raises(AdapterLoadError, match="esmfold-seq n_layers: 2 vs 3; esmfold-tri n_layers: 4 vs 6"):
        load_adapter(TinyTrunk(blocks=3), tmp_path / "trunk")
    tri_only = TinyTrunk()
    add_adapter(tri_only, LoRTAConfig(rank=1), layout="esmfold-tri")
    with pytest.raises(AdapterLoadError, match="families: esmfold-seq, esmfold-tri vs esmfold-tri"):
        load_adapter(tri_only, tmp_path / "trunk", name="other")


def test_save_load_round_trip_of_one_family(tmp_path):
    trunk = TinyTrunk().eval()
    args = inputs()
    randomize(add_adapter(trunk, LoRAConfig(rank=2), layout="esmfold-tri"), seed=1, scale=0.3)
    want = trunk(*args).detach()
    save_adapter(trunk, tmp_path / "tri")
    meta = json.loads((tmp_path / "tri" / "adapter_config.json").read_text())
    assert meta["format_version"] == 1 and meta["layout"]["family"] == "esmfold-tri"
    fresh = TinyTrunk().eval()
    load_adapter(fresh, tmp_path / "tri")  # the trunk has two families; the file names one
    assert get_adapter_set(fresh).families == ("esmfold-tri",) and torch.equal(fresh(*args), want)


@pytest.mark.parametrize("modes", [("heads",), ("heads", "matrices"), ("heads", "layers"), TENSOR_MODES])
def test_parameter_counts_per_family(modes):
    trunk = TinyTrunk()
    r, M = 3, 4
    group = add_adapter(trunk, LoRTAConfig(rank=r, modes=modes), layout=TRUNK)
    aset = get_adapter_set(trunk)
    total = 0
    for layout in aset.layouts:
        d, dh, H, L = layout.d_model, layout.head_dim, layout.n_heads, layout.n_layers
        expected = {("heads",): L * M * r * (d + dh + H), ("heads", "matrices"): L * r * (d + dh + H + M),
                    ("heads", "layers"): M * r * (d + dh + H + L), TENSOR_MODES: r * (d + dh + H + L + M)}[modes]
        part = group[layout.family]
        assert sum(p.numel() for p in part.parameters()) == expected == LoRTA.formula_num_parameters(part.config, layout)
        total += expected
    assert trainable_parameters(trunk) == total
    if modes == TENSOR_MODES:  # one tensor per family: r(d + d_H + H + L + 4) each
        assert total == r * (SEQ + HEAD + 4 + 2 + 4) + r * (PAIR + HEAD + 2 + 4 + 4)


def test_esmfold_3b_trunk_counts():
    seq, tri = architecture("esmfold_3B_v1_seq"), architecture("esmfold_3B_v1_tri")
    assert (seq.n_layers, seq.d_model, seq.n_heads, seq.head_dim) == (48, 1024, 32, 32)
    assert (tri.n_layers, tri.d_model, tri.n_heads, tri.head_dim) == (96, 128, 4, 32)
    for layout, expected in ((seq, 8 * (1024 + 32 + 32 + 48 + 4)), (tri, 8 * (128 + 32 + 4 + 96 + 4))):
        ad = build_adapter(LoRTAConfig(rank=8), layout, device="meta")
        assert sum(p.numel() for p in ad.parameters()) == expected
    lora = build_adapter(LoRAConfig(rank=8), seq, device="meta")
    assert sum(p.numel() for p in lora.parameters()) == 8 * 1024 * 48 * 8


def test_multi_family_set_api():
    trunk = TinyTrunk()
    with pytest.raises(LayoutError, match="several layouts"):
        add_adapter(trunk, LoRTAConfig(rank=2))
    group = add_adapter(trunk, LoRTAConfig(rank=2), layout=TRUNK)
    aset = get_adapter_set(trunk)
    assert aset.families == TRUNK and set(group) == set(TRUNK) and aset.get() is group
    with pytest.raises(AdapterError, match="spans 2 layout families"):
        aset.layout
    assert aset.delta_weight(0, "q", family="esmfold-tri").shape == (PAIR, PAIR)
    with pytest.raises(AdapterError, match="no layout family 'fair-esm'"):
        aset.delta_weight(0, "q", family="fair-esm")
    add_adapter(trunk, LoRAConfig(rank=1), name="second")  # the set's families, no layout needed
    assert set(aset.get("second")) == set(TRUNK)
    with pytest.raises(AdapterError, match="another layout: families: esmfold-seq vs esmfold-seq, esmfold-tri"):
        add_adapter(trunk, LoRTAConfig(rank=2), name="third", layout="esmfold-seq")
    state = {k for k in trunk.state_dict() if k.startswith("peft.")}
    assert "peft.adapters.default.esmfold-seq.A" in state and "peft.adapters.second.esmfold-tri.A.0_q" in state
