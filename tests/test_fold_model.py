"""The folding model: language-model loading, gradient flow into the adapter, outputs, losses."""

import math

import pytest
import torch

from esmfold_peft.data.features import chain_to_features, collate, crop
from esmfold_peft.data.structures import parse_structure
from esmfold_peft.fold.model.build import build_model, parameter_counts
from esmfold_peft.fold.model.lm import LanguageModelError, load_hf_esm, load_language_model
from esmfold_peft.fold.model.losses import fold_loss
from esmfold_peft.fold.train import seed_everything
from fold_fixtures import tiny_run_config, write_structures, write_tiny_hf_esm


def tiny_batch(tmp_path, n=2, crop_size=16):
    files = sorted(write_structures(tmp_path / "b", n, seed=3).glob("*.pdb"))
    feats = [crop(chain_to_features(parse_structure(f)[0]), crop_size, torch.Generator().manual_seed(0))
             for f in files]
    batch = collate(feats)
    batch["use_clamped_fape"] = torch.ones(n)
    return batch


def forward_loss(model, batch, cfg, recycles=0):
    out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=recycles)
    return out, fold_loss(out, batch, cfg.loss)


def test_hf_checkpoint_converts_to_the_same_function(tmp_path):
    from transformers import EsmModel

    path = write_tiny_hf_esm(tmp_path / "esm")
    ours = load_hf_esm(path).eval()
    theirs = EsmModel.from_pretrained(path).eval()
    toks = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2]])
    with torch.no_grad():
        a = ours(toks, repr_layers=[ours.num_layers])["representations"][ours.num_layers]
        b = theirs(toks).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_local_fair_esm_checkpoint_loads_without_regression_file(tmp_path):
    import argparse

    import esm
    import ml_collections as mlc

    torch.manual_seed(0)
    ref = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4).eval()
    state = {f"encoder.sentence_encoder.{k}": v for k, v in ref.state_dict().items()
             if not k.startswith("contact_head.regression")}
    cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, tmp_path / "my_tiny_esm2.pt")
    model, _, desc = load_language_model(mlc.ConfigDict({"path": str(tmp_path / "my_tiny_esm2.pt"), "name": ""}))
    toks = torch.tensor([[0, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(toks)["logits"], ref(toks)["logits"])
    assert "fair-esm checkpoint" in desc
    torch.save({"weights": state}, tmp_path / "other.pt")
    with pytest.raises(LanguageModelError, match="not a fair-esm checkpoint"):
        load_language_model(mlc.ConfigDict({"path": str(tmp_path / "other.pt"), "name": ""}))


def test_language_model_errors_are_clear(tmp_path, monkeypatch):
    import esm
    import ml_collections as mlc

    with pytest.raises(LanguageModelError, match="does not exist"):
        load_language_model(mlc.ConfigDict({"path": str(tmp_path / "nope"), "name": ""}))

    def offline(name):
        raise OSError("network unreachable")

    monkeypatch.setattr(esm.pretrained, "load_model_and_alphabet", offline)
    with pytest.raises(LanguageModelError, match="model.lm.path"):
        load_language_model(mlc.ConfigDict({"path": "", "name": "esm2_t6_8M_UR50D"}))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, _, _ = load_language_model(mlc.ConfigDict({"path": "", "name": "esm2_t6_8M_UR50D",
                                                           "random_init": True}))
    assert model.num_layers == 6 and model.embed_dim == 320


@pytest.mark.parametrize("adapter", ["lorta", "lora", "none", "full"])
def test_trainable_parts_and_gradient_flow(tmp_path, adapter):
    torch.manual_seed(0)
    cfg = tiny_run_config(tmp_path, adapter=adapter)
    model = build_model(cfg)
    counts = parameter_counts(model)
    batch = tiny_batch(tmp_path)
    _, (loss, terms) = forward_loss(model, batch, cfg)
    assert math.isfinite(terms["loss"]) and set(terms) >= {"fape", "supervised_chi", "distogram", "plddt"}
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, no_grad  # every trainable tensor gets a gradient (DDP relies on it)
    lm_grads = [p.grad for n, p in model.named_parameters() if n.startswith("esm.") and p.grad is not None]
    if adapter == "none":
        assert counts["adapter"] == 0 and counts["language_model"] == 0 and not lm_grads
    elif adapter == "full":
        assert counts["adapter"] == 0 and counts["language_model"] > 0
    else:
        assert counts["language_model"] == 0 and counts["adapter"] > 0
        # the adapter's zero-initialised factor gets a gradient through the trunk (no detach)
        zero_factor = model.esm.peft.get().B if adapter == "lorta" else model.esm.peft.get().B["0_q"]
        assert zero_factor.grad.abs().max() > 0


def test_outputs_are_esmfold_shaped(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_run_config(tmp_path)
    model = build_model(cfg).eval()
    batch = tiny_batch(tmp_path)
    with torch.no_grad():
        out = model(batch["aatype"], batch["mask"], batch["residue_index"], num_recycles=1)
    B, L = batch["aatype"].shape
    assert out["positions"].shape[1:] == (B, L, 14, 3)
    assert out["frames"].shape[1:] == (B, L, 7)
    assert out["distogram_logits"].shape == (B, L, L, 64)
    assert ((out["plddt"] >= 0) & (out["plddt"] <= 100)).all()
    assert ((out["ptm"] >= 0) & (out["ptm"] <= 1)).all()
    torch.testing.assert_close(out["distogram_logits"], out["distogram_logits"].transpose(1, 2))


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    cfg = tiny_run_config(tmp_path)
    cfg.model.trunk.structure_module.dropout_rate = 0.0
    batch = tiny_batch(tmp_path)
    grads = []
    for flag in (False, True):
        seed_everything(0)
        cfg.model.checkpoint_blocks = flag
        model = build_model(cfg)
        _, (loss, _) = forward_loss(model, batch, cfg)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_nonfinite_loss_is_not_hidden(tmp_path):
    cfg = tiny_run_config(tmp_path)
    model = build_model(cfg)
    batch = tiny_batch(tmp_path)
    batch["atom14_gt_positions"][0, 0, 0, 0] = float("nan")
    _, (loss, terms) = forward_loss(model, batch, cfg)
    assert not math.isfinite(terms["loss"])  # OpenFold's AlphaFoldLoss would have zeroed it
