"""Injection, initialisation, training signal, merging, saving and loading of adapters."""

import copy
import json
from pathlib import Path

import pytest
import torch

import background
import tiny_models as tm
from esmfold_peft.adapters import (AdapterError, AdapterLoadError, AttentionLayout, LayoutError, LoRA,
                                   LoRAConfig, LoRTA, LoRTAConfig, add_adapter, architecture, build_adapter,
                                   detect_layout, get_adapter_set, has_adapters, load_adapter, save_adapter,
                                   trainable_parameters, unload)
from esmfold_peft.adapters.config import TENSOR_MODES, AdapterConfigError, parse_modes

ROOT = Path(__file__).resolve().parents[1]


def count_params():
    """scripts/count_params.py, loaded once (its `main(argv)` runs in this process)."""
    from fold_fixtures import load_script

    return load_script("count_params")
CONFIGS = [LoRTAConfig(rank=4, alpha=8), LoRAConfig(rank=2, alpha=4)]


def perturb(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_layout_detection(family):
    model = tm.FAMILIES[family]()
    layout = detect_layout(model)
    expect = {"fair-esm": ("fair-esm", 2, 64, 4, 4, 16), "hf-bert": ("hf-bert", 2, 32, 4, 4, 8),
              "hf-roberta": ("hf-bert", 2, 32, 4, 4, 8), "hf-esm": ("hf-bert", 2, 32, 4, 4, 8),
              "hf-llama-gqa": ("hf-llama", 2, 48, 6, 2, 8)}[family]
    got = (layout.family, layout.n_layers, layout.d_model, layout.n_heads, layout.n_kv_heads, layout.head_dim)
    assert got == expect


def test_layout_errors_are_clear():
    with pytest.raises(LayoutError, match="no known attention layout"):
        detect_layout(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(LayoutError, match="unknown layout family"):
        detect_layout(tm.fair_esm2(), family="t5")
    with pytest.raises(LayoutError, match="not a multiple"):
        AttentionLayout("hf-llama", 2, 48, 6, 8, n_kv_heads=4)
    with pytest.raises(AdapterConfigError, match="LoRA"):
        LoRTAConfig(modes=("matrices", "layers"))


def test_bert_mlp_output_dense_is_not_mistaken_for_o():
    model = tm.hf_bert()
    layout = detect_layout(model)
    assert layout.projection_path(0, "o").endswith("attention.output.dense")
    add_adapter(model, LoRTAConfig(rank=2))
    hooked = [n for n, m in model.named_modules() if m._forward_hooks]
    assert sorted(hooked) == sorted(layout.projection_path(l, m) for l in range(2) for m in "qkvo")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_init_preserves_outputs_and_freezes_base(family, config):
    torch.manual_seed(0)
    model = tm.FAMILIES[family]().eval()
    toks = tm.tokens()
    before = tm.run(model, toks).detach()
    ad = add_adapter(model, copy.deepcopy(config))
    assert torch.equal(tm.run(model, toks), before)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in ad.parameters()}
    assert trainable_parameters(model) == type(ad).formula_num_parameters(ad.config, get_adapter_set(model).layout)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_every_factor_gets_gradient_within_two_steps(config):
    torch.manual_seed(0)
    model = tm.fair_esm2().train()
    ad = add_adapter(model, copy.deepcopy(config))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = {n: False for n, _ in ad.named_parameters()}
    initial = {n: p.detach().clone() for n, p in ad.named_parameters()}
    for step in range(2):
        opt.zero_grad()
        tm.run(model, tm.tokens(seed=step)).pow(2).mean().backward()
        for n, p in ad.named_parameters():
            seen[n] |= bool(p.grad is not None and p.grad.abs().max() > 0)
        opt.step()
    assert all(seen.values()), [n for n, s in seen.items() if not s]
    assert all(not torch.equal(initial[n], p) for n, p in ad.named_parameters())
    base = [p for n, p in model.named_parameters() if not n.startswith("peft.")]
    assert all(p.grad is None for p in base)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("family", list(tm.FAMILIES))
def test_merge_unmerge_round_trip(family, config):
    torch.manual_seed(0)
    model = tm.FAMILIES[family]().eval()
    toks = tm.tokens()
    ad = add_adapter(model, copy.deepcopy(config))
    perturb(ad)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = tm.run(model, toks).detach()
    aset = get_adapter_set(model)
    aset.merge()
    assert not any(m._forward_hooks for m in model.modules())  # merged = the base code path
    torch.testing.assert_close(tm.run(model, toks), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match="already merged"):
        aset.merge()
    aset.unmerge()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(tm.run(model, toks), adapted, rtol=1e-5, atol=1e-5)


def test_unload_leaves_a_plain_merged_model():
    torch.manual_seed(0)
    model = tm.hf_llama().eval()
    toks = tm.tokens()
    ad = add_adapter(model, LoRTAConfig(rank=3, alpha=3))
    perturb(ad)
    adapted = tm.run(model, toks).detach()
    unload(model)
    assert not hasattr(model, "peft")
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(tm.run(model, toks), adapted, rtol=1e-4, atol=1e-4)


def test_delta_weight_zero_for_untargeted():
    model = tm.fair_esm2()
    add_adapter(model, LoRTAConfig(rank=2, targets=("q", "v")))
    assert torch.count_nonzero(get_adapter_set(model).delta_weight(0, "k")) == 0


@pytest.mark.parametrize("config", CONFIGS + [LoRTAConfig(rank=3, modes=("heads", "matrices"))],
                         ids=["lorta", "lora", "lorta-hm"])
@pytest.mark.parametrize("family", ["fair-esm", "hf-llama-gqa"])
def test_save_load_round_trip(tmp_path, family, config):
    torch.manual_seed(0)
    model = tm.FAMILIES[family]().eval()
    toks = tm.tokens()
    ad = add_adapter(model, copy.deepcopy(config))
    perturb(ad)
    want = tm.run(model, toks).detach()
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == config.method and meta["num_parameters"] == sum(p.numel() for p in ad.parameters())

    torch.manual_seed(0)
    fresh = tm.FAMILIES[family]().eval()  # same base weights (same seed), no adapter
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(tm.run(fresh, toks), want)
    assert trainable_parameters(fresh) == sum(p.numel() for p in ad.parameters())


def test_lorta_factors_are_stored_once_under_documented_names(tmp_path):
    from safetensors.torch import load_file

    model = tm.fair_esm2(layers=3, dim=64, heads=4)
    add_adapter(model, LoRTAConfig(rank=8))
    save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert shapes == {"lorta.A": (64, 8), "lorta.B": (16, 8), "lorta.C_H": (4, 8),
                      "lorta.C_L": (3, 8), "lorta.C_M": (4, 8)}


def test_mismatched_loads_fail_clearly(tmp_path):
    torch.manual_seed(0)
    model = tm.fair_esm2(layers=2)
    add_adapter(model, LoRTAConfig(rank=4))
    save_adapter(model, tmp_path / "lorta")

    with pytest.raises(AdapterLoadError, match="n_layers: 2 vs 3"):
        load_adapter(tm.fair_esm2(layers=3), tmp_path / "lorta")
    with pytest.raises(AdapterLoadError, match="family: fair-esm vs hf-bert"):
        load_adapter(tm.hf_bert(), tmp_path / "lorta")

    # a config that claims another rank than the stored factors
    cfg_path = tmp_path / "lorta" / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["rank"] = 5
    cfg_path.write_text(json.dumps(meta))
    target = tm.fair_esm2(layers=2)  # other random weights: allowed here, where shapes are the point
    with pytest.raises(AdapterLoadError, match=r"lorta.A: saved \(64, 4\) vs expected \(64, 5\)"):
        load_adapter(target, tmp_path / "lorta", allow_other_base=True)
    assert not has_adapters(target) and not hasattr(target, "peft")  # nothing half-loaded

    # a config that claims another method than the stored tensors
    meta["config"]["rank"] = 4
    meta["method"] = "lora"
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("modes", "implementation")}
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterLoadError, match="missing tensors: lora.0.k.A"):
        load_adapter(tm.fair_esm2(layers=2), tmp_path / "lorta", allow_other_base=True)

    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        load_adapter(tm.fair_esm2(layers=2), tmp_path / "nowhere")

    twice = tm.fair_esm2(layers=2)
    add_adapter(twice, LoRAConfig(rank=1))
    meta["method"], meta["config"]["rank"] = "lorta", 4
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterLoadError, match="already has an adapter named 'default'"):
        load_adapter(twice, tmp_path / "lorta", allow_other_base=True)


def test_several_named_adapters_one_active(tmp_path):
    torch.manual_seed(0)
    model = tm.fair_esm2().eval()
    toks = tm.tokens()
    base = tm.run(model, toks).detach()
    a = add_adapter(model, LoRTAConfig(rank=2), name="tensor")
    b = add_adapter(model, LoRAConfig(rank=2), name="matrix")
    perturb(a, 1)
    perturb(b, 2)
    aset = get_adapter_set(model)
    assert aset.active == "tensor"
    out_a = tm.run(model, toks).detach()
    aset.set_active("matrix")
    out_b = tm.run(model, toks).detach()
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    with aset.disabled():
        assert torch.equal(tm.run(model, toks), base)
    aset.merge()
    with pytest.raises(AdapterError, match="is merged"):
        aset.set_active("tensor")
    aset.unmerge()
    aset.set_active("tensor")
    torch.testing.assert_close(tm.run(model, toks), out_a)
    with pytest.raises(AdapterError, match="already exists"):
        add_adapter(model, LoRAConfig(rank=1), name="tensor")
    save_adapter(model, tmp_path / "m", name="matrix")
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["method"] == "lora"


def test_fused_attention_path_cannot_bypass_adapter():
    """ESM-1b (no rotary) would take fair-esm's fused path that reads weights directly."""
    torch.manual_seed(0)
    model = tm.fair_esm1b().eval()
    toks = tm.tokens()
    base = tm.run(model, toks).detach()
    ad = add_adapter(model, LoRTAConfig(rank=2))
    perturb(ad)
    assert not torch.allclose(tm.run(model, toks), base, atol=1e-3)


def test_bfloat16_adapter_and_dropout():
    torch.manual_seed(0)
    model = tm.fair_esm2()
    ad = add_adapter(model, LoRTAConfig(rank=2, dtype="bfloat16", dropout=0.1))
    assert ad.A.dtype == torch.bfloat16
    perturb(ad)
    model.eval()
    out1, out2 = tm.run(model, tm.tokens()), tm.run(model, tm.tokens())
    assert torch.equal(out1, out2)  # no dropout in eval
    model.train()
    tm.run(model, tm.tokens()).float().sum().backward()
    assert ad.B.grad is not None and ad.B.grad.dtype == torch.bfloat16


def test_deepcopy_keeps_hooks_on_the_copy():
    torch.manual_seed(0)
    model = tm.fair_esm2().eval()
    add_adapter(model, LoRTAConfig(rank=2))
    clone = copy.deepcopy(model)
    perturb(get_adapter_set(clone).get())
    toks = tm.tokens()
    assert not torch.allclose(tm.run(clone, toks), tm.run(model, toks))
    get_adapter_set(clone).merge()
    assert any(m._forward_hooks for m in model.modules())  # the original is untouched


@pytest.mark.parametrize("modes", [("heads",), ("heads", "matrices"), ("heads", "layers"), TENSOR_MODES])
@pytest.mark.parametrize("arch", ["esm2_t12_35M", "roberta-base", "llama3-8b"])
def test_parameter_counts_equal_formulas(arch, modes):
    layout = architecture(arch)
    L, d, H, dh, M, r = layout.n_layers, layout.d_model, layout.n_heads, layout.head_dim, 4, 8
    expected = {("heads",): 4 * L * r * (d + dh + H), ("heads", "matrices"): L * r * (d + dh + H + 4),
                ("heads", "layers"): M * r * (d + dh + H + L), TENSOR_MODES: r * (d + dh + H + L + 4)}[modes]
    ad = build_adapter(LoRTAConfig(rank=r, modes=modes), layout, device="meta")
    assert sum(p.numel() for p in ad.parameters()) == expected == LoRTA.formula_num_parameters(ad.config, layout)
    lora = build_adapter(LoRAConfig(rank=r), layout, device="meta")
    q, kv = H * dh, layout.n_kv_heads * dh
    lora_expected = L * r * ((q + d) + 2 * (kv + d) + (d + q))
    assert sum(p.numel() for p in lora.parameters()) == lora_expected == LoRA.formula_num_parameters(lora.config, layout)
    if kv == q == d:
        assert lora_expected == 8 * d * L * r


@pytest.mark.parametrize("args,params", [
    ("--arch roberta-base --adapter lorta --rank 4", 3440),
    ("--arch roberta-large --adapter lorta --rank 8", 9056),
    ("--arch esm2_t12_35M --adapter lorta --rank 8", 4320),
    ("--arch esm2_t12_35M --adapter lora --rank 8", 368640),
    ("--layers 12 --d-model 480 --heads 20 --adapter lorta --rank 8 --modes heads,matrices", 12 * 8 * 528),
    ("--arch esm2_t12_35M --adapter lorta --rank 8 --modes all", 4320),
    ("--arch esmfold_3B_v1_seq --adapter lorta --rank 8", 8 * (1024 + 32 + 32 + 48 + 4)),
    ("--arch esmfold_3B_v1_tri --adapter lorta --rank 8", 8 * (128 + 32 + 4 + 96 + 4)),
    ("--arch esm2_t12_35M --adapter lorta --rank 8 --modes layers,heads", 4 * 8 * (480 + 24 + 20 + 12)),
])
def test_count_params_script_reproduces_paper(args, params, capsys):
    assert count_params().main(args.split() + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["params"] == params == record["formula"]
    assert count_params().main(args.split()) == 0  # the default: a table, the same count in it
    table = capsys.readouterr().out
    assert f"trainable parameters  {params:,}\n" in table and "(agrees)" in table and "{" not in table


@background.job("count_params_program")
def count_params_program(folder):
    return background.run(ROOT / "scripts" / "count_params.py", "--arch", "roberta-base", "--adapter", "lorta",
                          "--rank", "4", "--json")


def test_count_params_script_runs_as_a_program():
    out = background.result("count_params_program")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["params"] == 3440


@pytest.mark.parametrize("args,message", [
    ("--arch esm2_t12_35M --adapter lora --rank 8 --modes heads", "--modes applies to --adapter lorta only"),
    ("--arch esm2_t12_35M --adapter lorta --rank 8 --modes heads+matrices", "not understood: expected a comma"),
    ("--arch esm2_t12_35M --adapter lorta --rank 8 --modes matrices,layers", "LoRTA always tensorises heads"),
])
def test_count_params_script_refuses_bad_modes(args, message, capsys):
    assert count_params().main(args.split()) == 2
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and len(out.err.strip().splitlines()) == 1


def test_parse_modes_is_the_one_modes_syntax():
    assert parse_modes("all") == parse_modes("heads,matrices,layers") == TENSOR_MODES
    assert parse_modes(" layers , heads ") == ("heads", "layers")  # canonical order
    assert parse_modes(["heads", "matrices"]) == ("heads", "matrices")  # as stored in configs
    assert LoRTAConfig(modes="heads,matrices").modes == ("heads", "matrices")
    for bad in ("heads+matrices", "heads,heads", "", "all,heads", "heads,tokens"):
        with pytest.raises(AdapterConfigError, match="heads,matrices,layers, or all"):
            parse_modes(bad)


def test_one_registry_of_methods_and_has_adapters():
    from esmfold_peft.adapters import METHODS, Adapter, config_from_dict

    assert METHODS == ("lorta", "lora")
    layout = architecture("esm2_t6_8M")
    for cfg in (LoRTAConfig(rank=2), LoRAConfig(rank=2)):
        ad = build_adapter(cfg, layout, device="meta")
        assert isinstance(ad, Adapter) and ad.method == cfg.method
        assert type(config_from_dict(cfg.to_dict())) is type(cfg) and config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AdapterConfigError, match="unknown adapter method 'dora'; known: lorta, lora"):
        config_from_dict({"method": "dora"})
    model = tm.fair_esm2()
    assert not has_adapters(model)
    add_adapter(model, LoRTAConfig(rank=2))
    assert has_adapters(model) and not has_adapters(model.layers[0])  # the model itself, not submodules
    unload(model)
    assert not has_adapters(model)


def test_hf_mpnet_layout():
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=70, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0), add_pooling_layer=False).eval()
    layout = detect_layout(model)
    assert (layout.family, layout.n_layers, layout.d_model, layout.n_heads, layout.head_dim) == ("hf-mpnet", 2, 32, 4, 8)
    assert layout.projection_path(1, "o") == "encoder.layer.1.attention.attn.o"
    toks = tm.tokens()
    base = tm.run(model, toks).detach()
    ad = add_adapter(model, LoRTAConfig(rank=2))
    assert torch.equal(tm.run(model, toks), base)
    perturb(ad)
    adapted = tm.run(model, toks).detach()
    assert not torch.allclose(adapted, base, atol=1e-3)
    get_adapter_set(model).merge()
    torch.testing.assert_close(tm.run(model, toks), adapted, rtol=1e-4, atol=1e-4)
