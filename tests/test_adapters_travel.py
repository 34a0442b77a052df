"""Adapters that travel: PEFT's LoRA format both ways, the base each adapter records (and refuses others
by), fair-esm's ESM-2 and Hugging Face's as one base, the classification head beside an adapter, and
scripts/convert_adapter.py."""

import copy
import json
import logging
import warnings

import pytest
import torch

import tiny_models as tm
from esmfold_peft.adapters import (AdapterLoadError, LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set,
                                   has_adapters, is_peft_folder, load_adapter, read_adapter_config, save_adapter)
from esmfold_peft.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from esmfold_peft.adapters.provenance import fingerprints
from esmfold_peft.nlp.models import head_parameter_names

peft = pytest.importorskip("peft")


def perturb(adapter, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_((torch.rand(p.shape, generator=g) - 0.5) * scale)


def peft_load(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()


def out(model, toks):
    with torch.no_grad():
        o = model(input_ids=toks)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- tiny Hugging Face models (nothing downloaded) --------------------------------------------------

def bert_classifier(seed=0, labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def llama_gqa(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


MODELS = {"bert": bert_classifier, "llama": llama_gqa}


def trained_lora(kind, rank=4, alpha=8.0, targets=("q", "k", "v", "o")):
    """(base copy, adapted model, head names): our LoRA with nonzero factors, and a trained head for BERT."""
    model = MODELS[kind]()
    base = copy.deepcopy(model)
    perturb(add_adapter(model, LoRAConfig(rank=rank, alpha=alpha, targets=targets)))
    head = head_parameter_names(model) if kind == "bert" else []
    with torch.no_grad():
        for name in head:  # the head trains fully beside the adapter
            dict(model.named_parameters())[name].add_(0.3)
    return base, model.eval(), head


# --- 1. our LoRA in PEFT's format ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_our_lora_saved_as_peft_loads_in_peft_with_the_same_outputs(tmp_path, kind):
    base, model, head = trained_lora(kind, targets=("q", "v", "o") if kind == "llama" else ("q", "k", "v", "o"))
    save_adapter(model, tmp_path / "peft", format="peft", head=head)
    meta = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert meta["fan_in_fan_out"] is False and meta["bias"] == "none" and meta["use_rslora"] is False
    assert meta["task_type"] == ("SEQ_CLS" if kind == "bert" else "CAUSAL_LM")
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "peft" / WEIGHTS_NAME)))
    first = "bert.encoder.layer.0.attention.self.query" if kind == "bert" else "model.layers.0.self_attn.q_proj"
    assert f"base_model.model.{first}.lora_A.weight" in keys and f"base_model.model.{first}.lora_B.weight" in keys
    toks = tm.tokens(high=38)
    theirs = peft_load(copy.deepcopy(base), tmp_path / "peft")
    assert_same(out(theirs, toks), out(model, toks))
    assert (out(model, toks) - out(base, toks)).abs().max() > 1e-2  # the adapter (and head) matter
    # and our own loader reads the folder back to the same function
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "peft")
    assert_same(out(again.eval(), toks), out(model, toks))


def test_lorta_has_no_peft_format_and_says_how_to_load_it(tmp_path):
    model = bert_classifier()
    add_adapter(model, LoRTAConfig(rank=2))
    with pytest.raises(ValueError, match="no PEFT type") as info:
        save_adapter(model, tmp_path / "x", format="peft")
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()
    save_adapter(model, tmp_path / "lorta")
    meta = read_adapter_config(tmp_path / "lorta")
    assert meta["library"] == "esmfold-peft" and meta["library_version"]
    assert "load_adapter(model, DIR)" in meta["how_to_load"] and "\n" not in meta["how_to_load"]


# --- 2. PEFT's LoRA folders through our loader -----------------------------------------------------

def peft_folder(kind, directory, rslora=False, **extra):
    """A LoRA written by PEFT itself on a copy of the base (nonzero B); returns the base."""
    base = MODELS[kind]()
    targets = ["query", "key", "value", "attention.output.dense"] if kind == "bert" else \
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, task_type=task, use_rslora=rslora, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_((torch.rand(p.shape, generator=g) - 0.5) * 0.3)
    theirs.save_pretrained(str(directory))
    return base


@pytest.mark.parametrize("kind,rslora", [("bert", False), ("llama", False), ("llama", True)])
def test_peft_lora_folders_load_with_peft_s_outputs(tmp_path, kind, rslora):
    base = peft_folder(kind, tmp_path / "p", rslora=rslora)
    assert is_peft_folder(tmp_path / "p")
    toks = tm.tokens(high=38)
    expected = out(peft_load(copy.deepcopy(base), tmp_path / "p"), toks)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PEFT warning path here; our own note on the base is a log line
        adapter = load_adapter(ours, tmp_path / "p")
    assert adapter.method == "lora" and adapter.config.rank == 4
    assert_same(out(ours.eval(), toks), expected)
    assert (expected - out(base, toks)).abs().max() > 1e-3


def test_peft_folders_we_cannot_represent_are_one_line(tmp_path):
    base = bert_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["query", "value"],
                                                                        feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterLoadError, match="a PEFT IA3 adapter; esmfold-peft reads PEFT LoRA adapters only") as info:
        load_adapter(copy.deepcopy(base), tmp_path / "ia3")
    assert str(tmp_path / "ia3") in str(info.value) and "\n" not in str(info.value)
    mlp = bert_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(copy.deepcopy(mlp), peft.LoraConfig(r=2, target_modules=["query", "intermediate.dense"]))
    m.save_pretrained(str(tmp_path / "mlp"))
    target = copy.deepcopy(mlp)
    with pytest.raises(AdapterLoadError, match="intermediate.dense is not an attention projection") as info:
        load_adapter(target, tmp_path / "mlp")
    assert "\n" not in str(info.value) and not has_adapters(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora = peft.get_peft_model(copy.deepcopy(mlp), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(AdapterLoadError, match="use_dora=True"):
        load_adapter(copy.deepcopy(mlp), tmp_path / "dora")


# --- 5. the base each adapter records ---------------------------------------------------------------

def test_adapters_record_their_base_and_refuse_another(tmp_path, caplog):
    model = tm.hf_bert()
    perturb(add_adapter(model, LoRTAConfig(rank=2)))
    save_adapter(model, tmp_path / "a")
    base = read_adapter_config(tmp_path / "a")["base"]
    assert base["architecture"] == "bert" and base["dtype"] == "float32"
    assert set(base["sha256"]) == {"float32", "bfloat16", "float16"} and all(len(v) == 64 for v in base["sha256"].values())
    other = tm.hf_bert()  # the same shapes, other weights
    with pytest.raises(AdapterLoadError, match="made for another base model: saved for bert BertModel") as info:
        load_adapter(other, tmp_path / "a")
    text = str(info.value)
    assert "\n" not in text and base["sha256"]["float32"][:12] in text and "allow_other_base=True" in text
    assert not has_adapters(other)
    with caplog.at_level(logging.WARNING, logger="esmfold_peft.adapters"):
        load_adapter(other, tmp_path / "a", allow_other_base=True)
    assert "loaded anyway" in caplog.text
    # text models and protein models are never confused, not even when allowed
    for target in (tm.hf_roberta(), tm.hf_esm()):
        with pytest.raises(AdapterLoadError, match=r"made for a bert model .* this is a (roberta|esm) model"):
            load_adapter(target, tmp_path / "a", allow_other_base=True)


def test_a_base_stored_in_bfloat16_is_the_same_base(tmp_path):
    model = tm.hf_bert()
    reference = copy.deepcopy(model)
    perturb(add_adapter(model, LoRAConfig(rank=2)))
    save_adapter(model, tmp_path / "a")
    reduced = copy.deepcopy(reference)
    for layer in reduced.encoder.layer:  # what model.lm.storage_dtype=bfloat16 does to a frozen base
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                    layer.attention.output.dense):
            lin.to(torch.bfloat16)
    load_adapter(reduced, tmp_path / "a")  # no refusal
    fresh = copy.deepcopy(reference)
    with torch.no_grad():
        fresh.encoder.layer[0].attention.self.query.weight[0, 0] += 1.0
    with pytest.raises(AdapterLoadError, match="another base model"):
        load_adapter(fresh, tmp_path / "a")


def test_old_adapters_without_a_base_load_with_one_warning(tmp_path, caplog):
    model = tm.hf_bert()
    reference = copy.deepcopy(model)
    perturb(add_adapter(model, LoRTAConfig(rank=2)))
    save_adapter(model, tmp_path / "old")
    path = tmp_path / "old" / CONFIG_NAME
    meta = json.loads(path.read_text())
    del meta["base"], meta["library_version"], meta["how_to_load"]
    meta["library"] = "esmfold-peft 0.1.0"  # as written before
    path.write_text(json.dumps(meta))
    toks = tm.tokens()
    with caplog.at_level(logging.WARNING, logger="esmfold_peft.adapters"):
        for _ in range(2):
            target = copy.deepcopy(reference)
            load_adapter(target, tmp_path / "old")
    assert caplog.text.count("records no base model") == 1 and "cannot be checked" in caplog.text
    torch.testing.assert_close(tm.run(target.eval(), toks), tm.run(model.eval(), toks))


def test_a_merged_adapter_saves_without_a_fingerprint_and_loads_with_a_warning(tmp_path, caplog):
    model = tm.hf_bert()
    reference = copy.deepcopy(model)
    perturb(add_adapter(model, LoRAConfig(rank=2)))
    get_adapter_set(model).merge()
    save_adapter(model, tmp_path / "m")
    base = read_adapter_config(tmp_path / "m")["base"]
    assert base["sha256"] is None and "merged" in base["note"] and base["architecture"] == "bert"
    with caplog.at_level(logging.WARNING, logger="esmfold_peft.adapters"):
        load_adapter(copy.deepcopy(reference), tmp_path / "m")
    assert "no fingerprint of its base (saved while merged)" in caplog.text
    with pytest.raises(AdapterLoadError, match="made for a bert model"):  # the architecture is still checked
        load_adapter(tm.hf_esm(), tmp_path / "m")


def test_a_damaged_base_record_is_one_line(tmp_path):
    model = tm.hf_bert()
    reference = copy.deepcopy(model)
    add_adapter(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["base"]["sha256"] = "abc"
    path.write_text(json.dumps(meta))
    with pytest.raises(AdapterLoadError, match="key 'base'.sha256 should be an object") as info:
        load_adapter(copy.deepcopy(reference), tmp_path / "a")
    assert str(path) in str(info.value)


# --- fair-esm's ESM-2 and Hugging Face's: one base -------------------------------------------------

@pytest.fixture(scope="module")
def esm_pair(tmp_path_factory):
    """The same tiny ESM-2 as Hugging Face's EsmModel and as fair-esm's ESM2 (converted by lm.py)."""
    from fold_fixtures import write_tiny_hf_esm
    from transformers import EsmModel

    from esmfold_peft.fold.model.lm import load_hf_esm

    path = write_tiny_hf_esm(tmp_path_factory.mktemp("esm") / "tiny")
    return lambda: (load_hf_esm(path).eval(), EsmModel.from_pretrained(str(path)).eval())


def esm_outputs(fair, hf, toks):
    with torch.no_grad():
        a = fair(toks, repr_layers=[fair.num_layers])["representations"][fair.num_layers]
        b = hf(toks).last_hidden_state
    return a, b


@pytest.mark.parametrize("config", [LoRTAConfig(rank=4, alpha=8), LoRAConfig(rank=2, alpha=4)], ids=["lorta", "lora"])
@pytest.mark.parametrize("made_on", ["fair-esm", "hf"])
def test_an_esm2_adapter_loads_across_fair_esm_and_hugging_face(tmp_path, esm_pair, config, made_on):
    fair, hf = esm_pair()
    linear = lambda m: (lambda p: m.get_submodule(p))  # noqa: E731
    from esmfold_peft.adapters import detect_layout
    assert fingerprints(linear(fair), [detect_layout(fair)]) == fingerprints(linear(hf), [detect_layout(hf)])
    source, target = (fair, hf) if made_on == "fair-esm" else (hf, fair)
    perturb(add_adapter(source, copy.deepcopy(config)), scale=0.5)
    save_adapter(source, tmp_path / "a")
    assert read_adapter_config(tmp_path / "a")["base"]["architecture"] == "esm"
    load_adapter(target, tmp_path / "a")
    toks = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2]])
    a, b = esm_outputs(fair, hf, toks)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bare_fair, _ = esm_pair()
    with torch.no_grad():
        plain = bare_fair(toks, repr_layers=[2])["representations"][2]
    assert (a - plain).abs().max() > 1e-2  # the adapter changed both alike


def test_a_bert_adapter_never_goes_onto_an_esm2(tmp_path, esm_pair):
    fair, hf = esm_pair()
    bert = tm.hf_bert()  # the same shapes as the tiny ESM-2 (L=2, d=32, H=4)
    add_adapter(bert, LoRAConfig(rank=2))
    save_adapter(bert, tmp_path / "bert")
    with pytest.raises(AdapterLoadError, match="made for a bert model"):
        load_adapter(hf, tmp_path / "bert", allow_other_base=True)
    with pytest.raises(AdapterLoadError, match="family: hf-bert vs fair-esm"):
        load_adapter(fair, tmp_path / "bert", allow_other_base=True)


# --- 6. the classification head beside an adapter -------------------------------------------------

def test_load_adapter_restores_the_classifier_head(tmp_path):
    base, model, head = trained_lora("bert")
    save_adapter(model, tmp_path / "a", head=head)
    assert (tmp_path / "a" / "head.safetensors").is_file()
    toks = tm.tokens(high=38)
    target = copy.deepcopy(base)
    load_adapter(target, tmp_path / "a")
    assert_same(out(target.eval(), toks), out(model, toks))
    without = copy.deepcopy(base)
    load_adapter(without, tmp_path / "a", head=False)
    assert not torch.equal(without.classifier.weight, model.classifier.weight)
    # a head for another number of labels does not fit: one line, nothing loaded
    other = bert_classifier(labels=2)
    with pytest.raises(AdapterLoadError, match="classification head saved here does not fit") as info:
        load_adapter(other, tmp_path / "a", allow_other_base=True)
    assert "\n" not in str(info.value) and not has_adapters(other)


# --- 3. scripts/convert_adapter.py -----------------------------------------------------------------

def convert(*argv):
    from fold_fixtures import load_script

    return load_script("convert_adapter").main([str(a) for a in argv])


def test_convert_adapter_both_ways_keeps_the_function_and_the_base(tmp_path, capsys):
    base, model, head = trained_lora("bert")
    base.save_pretrained(str(tmp_path / "base"))
    save_adapter(model, tmp_path / "native", head=head)
    assert convert("--to", "peft", "--adapter", tmp_path / "native", "--out", tmp_path / "peft",
                   "--base", tmp_path / "base") == 0
    printed = capsys.readouterr().out
    assert "next: PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(" in printed
    toks = tm.tokens(high=38)
    assert_same(out(peft_load(copy.deepcopy(base), tmp_path / "peft"), toks), out(model, toks))
    assert convert("--to", "native", "--adapter", tmp_path / "peft", "--out", tmp_path / "back",
                   "--base", tmp_path / "base") == 0
    assert read_adapter_config(tmp_path / "back")["base"] == read_adapter_config(tmp_path / "native")["base"]
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "back")
    assert_same(out(again.eval(), toks), out(model, toks))


def test_convert_adapter_refuses_in_one_line(tmp_path, capsys):
    model = bert_classifier()
    model.save_pretrained(str(tmp_path / "base"))
    add_adapter(model, LoRTAConfig(rank=2))
    save_adapter(model, tmp_path / "lorta")
    other = bert_classifier(seed=5)
    add_adapter(other, LoRAConfig(rank=2))
    save_adapter(other, tmp_path / "other")
    cases = [(("--to", "peft", "--adapter", tmp_path / "lorta"), "a lorta adapter has no PEFT type"),
             (("--to", "native", "--adapter", tmp_path / "lorta"), "already in esmfold-peft's format"),
             (("--to", "peft", "--adapter", tmp_path / "other"), "made for another base model"),
             (("--to", "peft", "--adapter", tmp_path / "nowhere"), "no adapter_config.json")]
    capsys.readouterr()  # transformers' bar while the base was written
    for argv, message in cases:
        assert convert(*argv, "--out", tmp_path / "x", "--base", tmp_path / "base") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not (tmp_path / "x").exists()
    assert convert("--to", "peft", "--adapter", tmp_path / "other", "--out", tmp_path / "x", "--base",
                   tmp_path / "base", "--allow-other-base") == 0


def test_a_fair_esm_lora_converts_to_peft_for_the_same_esm2_in_hugging_faces_layout(tmp_path, esm_pair):
    """A LoRA trained on fair-esm's ESM-2 (a folding run's language model) goes to PEFT's format with the Hugging
    Face folder of the same weights as --base; PEFT then gives fair-esm's adapted outputs."""
    from fold_fixtures import write_tiny_hf_esm
    from transformers import EsmForMaskedLM

    folder = write_tiny_hf_esm(tmp_path / "hf_esm")
    fair, _ = esm_pair()
    perturb(add_adapter(fair, LoRAConfig(rank=2, alpha=4)), scale=0.5)
    save_adapter(fair, tmp_path / "native")
    assert convert("--to", "peft", "--adapter", tmp_path / "native", "--out", tmp_path / "peft",
                   "--base", folder) == 0
    toks = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2]])
    peft_model = peft_load(EsmForMaskedLM.from_pretrained(str(folder)).eval(), tmp_path / "peft")
    with torch.no_grad():
        ours = fair(toks, repr_layers=[fair.num_layers])["representations"][fair.num_layers]
        theirs = peft_model(toks, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    bare, _ = esm_pair()
    with torch.no_grad():
        assert (ours - bare(toks, repr_layers=[2])["representations"][2]).abs().max() > 1e-2
