"""ESM-2 attention through SDPA (esmfold_peft/fold/model/esm_attention.py) computes fair-esm's function.

Every comparison runs one small random ESM2 twice on the same batch (which holds padding): with
fair-esm's forward and with `sdpa_forward`, and compares outputs and gradients.
"""

import copy
import warnings

import pytest
import torch

esm = pytest.importorskip("esm")

from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set  # noqa: E402
from esmfold_peft.fold.model.esm_attention import disable_sdpa, enable_sdpa, sdpa_enabled, sdpa_forward  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
LAYERS = 2


def tiny_esm2(seed=0):
    torch.manual_seed(seed)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    return esm.model.esm2.ESM2(num_layers=LAYERS, embed_dim=64, attention_heads=4, alphabet=alphabet,
                               token_dropout=True)


def padded_tokens(model, seed=1):
    """3 sequences of lengths 12, 9 and 6 (with BOS/EOS), padded to 12; one holds a <mask> token."""
    al = model.alphabet
    g = torch.Generator().manual_seed(seed)
    aa = torch.tensor([al.get_idx(c) for c in "ACDEFGHIKLMNPQRSTVWY"])
    toks = aa[torch.randint(0, 20, (3, 12), generator=g)]
    for row, n in enumerate((12, 9, 6)):
        toks[row, 0], toks[row, n - 1] = al.cls_idx, al.eos_idx
        toks[row, n:] = al.padding_idx
    toks[1, 3] = al.mask_idx
    return toks


def randomise_adapter(model):
    """Nonzero update: the factors that start at zero get random values."""
    adapter = get_adapter_set(model).get()
    with torch.no_grad():
        for p in adapter.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.3)
    return adapter


def run(model, toks, **kw):
    """(representations, logits, gradients) of a forward + backward through every layer."""
    model.zero_grad(set_to_none=True)
    out = model(toks, repr_layers=range(LAYERS + 1), **kw)
    reps = torch.stack([out["representations"][i] for i in range(LAYERS + 1)])
    loss = (reps[1:] ** 2).mean() + out["logits"].logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return reps.detach(), out["logits"].detach(), grads, out


def assert_same_run(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-4)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-4, atol=1e-5, msg=name)


def original_and_sdpa(model, toks, **kw):
    disable_sdpa(model)
    ref = run(model, toks, **kw)
    assert enable_sdpa(model) == LAYERS
    return ref, run(model, toks, **kw)


def test_frozen_model_same_outputs_and_gradients_with_padding():
    model = tiny_esm2().train()  # gradients w.r.t. every parameter, as full fine-tuning
    toks = padded_tokens(model)
    ref, new = original_and_sdpa(model, toks)
    assert_same_run(ref, new)
    assert any(n.startswith("layers.0.self_attn.q_proj") for n in new[2])
    # padded positions: the original's outputs there are reproduced too, not only the real residues
    pad = toks.eq(model.padding_idx)
    assert pad.any()
    torch.testing.assert_close(ref[0][:, pad], new[0][:, pad], **TOL)


@pytest.mark.parametrize("config", [LoRTAConfig(rank=4, alpha=4), LoRAConfig(rank=4, alpha=4)],
                         ids=["lorta", "lora"])
def test_adapter_hooks_fire_and_gradients_match(config):
    model = tiny_esm2()
    toks = padded_tokens(model)
    with torch.no_grad():
        frozen = model(toks, repr_layers=[LAYERS])["representations"][LAYERS]
    add_adapter(model, config)
    adapter = randomise_adapter(model)
    calls = []
    handles = [model.get_submodule(f"layers.{i}.self_attn.{m}_proj").register_forward_hook(
        lambda *a, m=m: calls.append(m)) for i in range(LAYERS) for m in ("q", "k", "v", "out")]
    ref, new = original_and_sdpa(model, toks)
    for h in handles:
        h.remove()
    assert calls[:4 * LAYERS] == calls[4 * LAYERS:] == ["q", "k", "v", "out"] * LAYERS  # same calls, same order
    assert_same_run(ref, new)
    # the adapter changes the output (so the comparison above sees it), and only its factors train
    assert (new[0][LAYERS] - frozen).abs().max() > 1e-3
    factor_names = {f"peft.adapters.default.{n}" for n, _ in adapter.named_parameters()}
    assert set(new[2]) == factor_names
    assert all(g.abs().max() > 0 for g in new[2].values())


def test_merged_adapter_gives_the_same_output_under_sdpa():
    model = tiny_esm2().eval()
    toks = padded_tokens(model)
    add_adapter(model, LoRTAConfig(rank=4, alpha=4))
    randomise_adapter(model)
    enable_sdpa(model)
    with torch.no_grad():
        unmerged = model(toks, repr_layers=[LAYERS])["representations"][LAYERS]
        get_adapter_set(model).merge()
        merged = model(toks, repr_layers=[LAYERS])["representations"][LAYERS]
        disable_sdpa(model)
        merged_original = model(toks, repr_layers=[LAYERS])["representations"][LAYERS]
    torch.testing.assert_close(merged, unmerged, **TOL)
    torch.testing.assert_close(merged, merged_original, **TOL)


def test_head_weights_and_contacts_fall_back_to_the_original():
    model = tiny_esm2().eval()
    toks = padded_tokens(model)
    with torch.no_grad():
        ref = model(toks, repr_layers=[LAYERS], return_contacts=True)
        enable_sdpa(model)
        contacts = model(toks, repr_layers=[LAYERS], return_contacts=True)
        heads = model(toks, need_head_weights=True)
    assert sdpa_enabled(model)
    for key in ("logits", "attentions", "contacts"):
        torch.testing.assert_close(contacts[key], ref[key], **TOL)
    torch.testing.assert_close(heads["attentions"], ref["attentions"], **TOL)
    assert heads["attentions"].shape == (3, LAYERS, 4, 12, 12)


def test_unsupported_arguments_fall_back_and_averaged_weights_are_not_computed():
    model = tiny_esm2().eval()
    attn = model.layers[0].self_attn
    x = torch.randn(7, 2, 64)
    causal = torch.triu(torch.full((7, 7), float("-inf")), 1)
    with torch.no_grad():
        ref, ref_w = attn(x, x, x, attn_mask=causal)
        enable_sdpa(model)
        out, w = attn(x, x, x, attn_mask=causal)
        plain, none = attn(x, x, x, need_weights=True)
        plain_ref, _ = type(attn).forward(attn, x, x, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(plain, plain_ref, **TOL)
    assert none is None  # ESM2 discards the head-averaged weights; SDPA does not make them


def test_enable_is_per_instance_and_undone_by_disable():
    model, other = tiny_esm2(), tiny_esm2()
    class_forward = type(model.layers[0].self_attn).forward
    assert enable_sdpa(model) == LAYERS and sdpa_enabled(model) and not sdpa_enabled(other)
    assert type(model.layers[0].self_attn).forward is class_forward
    assert model.layers[0].self_attn.forward.func is sdpa_forward
    assert model.state_dict().keys() == other.state_dict().keys()
    copied = copy.deepcopy(model)  # the copy's attention runs on the copy's weights
    assert copied.layers[0].self_attn.forward.args[0] is copied.layers[0].self_attn
    assert disable_sdpa(model) == LAYERS and not sdpa_enabled(model) and sdpa_enabled(copied)
    assert model.layers[0].self_attn.forward.__func__ is class_forward
    with pytest.raises(ValueError, match="no fair-esm MultiheadAttention"):
        enable_sdpa(torch.nn.Linear(2, 2))


def test_load_language_model_turns_sdpa_on_unless_configured_off():
    import ml_collections as mlc

    from esmfold_peft.fold.model.lm import load_language_model

    cfg = {"path": "", "name": "esm2_t6_8M_UR50D", "random_init": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        default, _, _ = load_language_model(mlc.ConfigDict(cfg))  # no `sdpa` key yet: on
        off, _, _ = load_language_model(mlc.ConfigDict({**cfg, "sdpa": False}))
    assert sdpa_enabled(default) and not sdpa_enabled(off)
