"""Hugging Face's ESMFold (transformers' `EsmForProteinFolding`): read into our model, predicting what transformers
predicts, and written back as a folder transformers loads; the HF ESM config fields that change the LM's forward.

Every model here is a small random one built with transformers and saved with `save_pretrained` (nothing is
downloaded). transformers' port zero-initialises some final layers, so every folding tensor is perturbed
before saving (as the fair-esm parity tests do), and the comparisons are not of constants.
"""

from __future__ import annotations

import json

import pytest
import torch

from esmfold_peft.fold.model.lm import LanguageModelError, load_hf_esm, load_language_model
from esmfold_peft.fold.run.esmfold_read import config_from_checkpoint, init_from_checkpoint, load_esmfold_checkpoint
from esmfold_peft.fold.run.hf_esmfold import esmfold_to_hf_key, hf_to_esmfold_key
from esmfold_peft.runtime.errors import ArtifactError, ConfigError, UserError
from fold_fixtures import TINY_LM, folding_inputs as inputs, one_line

transformers = pytest.importorskip("transformers")
from transformers import EsmConfig, EsmForProteinFolding, EsmModel  # noqa: E402

# outputs both models name alike (transformers' pLDDT is 0..1, ours 0..100; its pTM is one number for a batch
# of any padding, ours one per chain: the pTM head's logits and PAE are compared instead)
COMPARED = ("positions", "frames", "angles", "states", "plddt", "distogram_logits", "lm_logits", "ptm_logits",
            "predicted_aligned_error")
SM = dict(sequence_dim=16, pairwise_dim=8, ipa_dim=8, resnet_dim=8, num_heads_ipa=2, num_qk_points=2, num_v_points=3,
          num_blocks=2)
TRUNK = dict(num_blocks=2, sequence_state_dim=32, pairwise_state_dim=16, sequence_head_width=16, pairwise_head_width=8,
             max_recycles=2, chunk_size=None, structure_module=SM)


def hf_config(fp16_esm=False, **lm_overrides) -> EsmConfig:
    lm = {**TINY_LM, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **lm_overrides}
    return EsmConfig(**lm, is_folding_model=True, vocab_list=None,
                     esmfold_config=dict(trunk=TRUNK, lddt_head_hid_dim=16, fp16_esm=fp16_esm, esm_type="esm2_3B"))


def write_hf_esmfold(folder, seed=1, fp16_esm=False, **save_kwargs):
    """A random EsmForProteinFolding (2 trunk blocks, a 2-layer 32-wide ESM-2) saved with save_pretrained."""
    torch.manual_seed(seed)
    model = EsmForProteinFolding(hf_config(fp16_esm))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("esm."):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return folder


def transformers_model(folder) -> EsmForProteinFolding:
    model = EsmForProteinFolding.from_pretrained(folder).eval()
    model.esm.float()  # fp16_esm: transformers halves its LM (on CPU too); ours runs it in float32
    return model


def predict(model, num_recycles=None) -> dict:
    """Both models' forward on `inputs()`. transformers' `num_recycles` means what ours (and fair-esm's) means:
    None = the config's max_recycles trunk passes, n = n + 1 passes."""
    aatype, mask, residx = inputs()
    with torch.no_grad():
        if isinstance(model, EsmForProteinFolding):
            out = dict(model(aatype, attention_mask=mask, position_ids=residx, num_recycles=num_recycles))
            out["plddt"] = 100 * out["plddt"]
            return out
        return model(aatype, mask, residx, num_recycles=num_recycles)


def assert_same(a, b):
    for key in COMPARED:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)


@pytest.fixture()
def folder(tmp_path):
    return write_hf_esmfold(tmp_path / "esmfold_hf")


# --- reading: the same predictions as transformers ---------------------------------------------------

def test_predicts_what_transformers_predicts(folder):
    from esmfold_peft.fold.run.confidence import PER_ATOM, model_heads

    theirs = transformers_model(folder)
    ours, cfg = load_esmfold_checkpoint(folder)
    assert not ours.training and not any(p.requires_grad for p in ours.esm.parameters())
    for recycles in (None, 0, 1):
        a, b = predict(theirs, recycles), predict(ours, recycles)
        assert_same(a, b)
    assert b["positions"].std() > 0.1 and b["plddt"].std() > 0.1  # not a comparison of constants
    assert cfg.model.lm.path == str(folder) and not cfg.model.lm.name
    assert cfg.model.init_from == str(folder / "model.safetensors") and cfg.adapter.method == "none"
    assert cfg.model.trunk.num_blocks == 2 and cfg.model.trunk.structure_module.c_s == 16
    assert cfg.model.trunk.structure_module.no_qk_points == 2 and cfg.model.lddt_head_hid_dim == 16
    # Meta's heads: per-atom pLDDT, a trained pTM head
    assert ours.confidence_record is None
    heads = model_heads(ours)
    assert heads.plddt == PER_ATOM and heads.ptm
    # the weights file names the same model; so does the folder given as a string, with the LM's plain attention
    same, _ = load_esmfold_checkpoint(str(folder / "model.safetensors"), lm={"path": str(folder), "sdpa": False})
    assert_same(a, predict(same, 1))


def test_fp16_esm_folder_and_sharded_weights(tmp_path):
    folder = write_hf_esmfold(tmp_path / "fp16_sharded", fp16_esm=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ours, cfg = load_esmfold_checkpoint(folder)
    assert next(ours.esm.parameters()).dtype == torch.float32  # the LM in float32, whatever fp16_esm says
    assert cfg.model.init_from == str(folder / "model.safetensors.index.json")
    assert_same(predict(transformers_model(folder)), predict(ours))


def test_pytorch_model_bin_folder(folder, tmp_path):
    from safetensors.torch import load_file

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(str(folder / "model.safetensors")), bin_folder / "pytorch_model.bin")
    a, _ = load_esmfold_checkpoint(folder)
    b, cfg = load_esmfold_checkpoint(bin_folder)
    assert cfg.model.init_from == str(bin_folder / "pytorch_model.bin")
    assert_same(predict(a), predict(b))


def test_the_key_mapping():
    assert hf_to_esmfold_key("esm.encoder.layer.0.attention.self.query.weight") is None
    assert hf_to_esmfold_key("af2_to_esm") is None
    assert hf_to_esmfold_key("trunk.structure_module.default_frames") is None
    assert hf_to_esmfold_key("trunk.blocks.0.layernorm_1.gamma") == "trunk.blocks.0.layernorm_1.weight"
    assert hf_to_esmfold_key("trunk.blocks.0.tri_att_end.mha.linear_q.weight") == \
        "trunk.blocks.0.tri_att_end.mha.linear_q.weight"
    assert esmfold_to_hf_key("trunk.structure_module.ipa.linear_q_points.linear.weight") == \
        "trunk.structure_module.ipa.linear_q_points.weight"


def test_another_language_model_replaces_the_folders(folder, tmp_path):
    from fold_fixtures import write_tiny_hf_esm

    other = write_tiny_hf_esm(tmp_path / "other_esm", seed=7)  # the same shape, other weights
    ours, cfg = load_esmfold_checkpoint(folder, lm=str(other))
    assert cfg.model.lm.path == str(other)
    reference = load_hf_esm(other)
    assert torch.equal(ours.esm.embed_tokens.weight, reference.embed_tokens.weight)
    own, _ = load_esmfold_checkpoint(folder)
    assert (predict(ours)["positions"] - predict(own)["positions"]).abs().max() > 1e-3
    wide = tmp_path / "wide_esm"
    torch.manual_seed(0)
    EsmModel(EsmConfig(**{**TINY_LM, "hidden_size": 64, "intermediate_size": 256})).save_pretrained(wide)
    with pytest.raises(ArtifactError, match="2 layers x 32.*2 layers x 64") as exc:
        load_esmfold_checkpoint(folder, lm=str(wide))
    one_line(exc, folder)


def test_the_folder_as_a_language_model(folder):
    lm = load_hf_esm(folder)  # its ESM-2 (esm.*), the folding tensors left alone
    theirs = transformers_model(folder).esm
    toks = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2, 1]])
    with torch.no_grad():
        a = lm(toks, repr_layers=[lm.num_layers])["representations"][lm.num_layers]
        b = theirs(toks, attention_mask=toks != 1).last_hidden_state
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-4, atol=1e-4)


def test_init_from_the_weights_file(folder):
    from esmfold_peft.fold.model.build import build_model

    reference, cfg = load_esmfold_checkpoint(folder)
    rebuilt = build_model(config_from_checkpoint(folder)).eval()
    assert config_from_checkpoint(folder / "config.json").model.init_from == str(folder / "model.safetensors")
    init_from_checkpoint(rebuilt, cfg)
    assert rebuilt.confidence_record is None
    assert_same(predict(reference), predict(rebuilt))
    cfg.model.init_from = str(folder)  # a run records the SHA-256 of one file: the folder's weights are named
    with pytest.raises(ConfigError, match="model.safetensors") as exc:
        init_from_checkpoint(rebuilt, cfg)
    one_line(exc, folder)


def test_predict_fasta_with_a_folder(folder, tmp_path):
    from esmfold_peft.fold.predict import predict_fasta

    fasta = tmp_path / "q.fasta"
    fasta.write_text(">q1\nMKTAYIAKQRQISFVKSHF\n>q2\nGSHMLE\n")
    run = predict_fasta(fasta, None, tmp_path / "pred", esmfold=folder, device="cpu", progress=False)
    assert len(run.predicted) == 2
    assert {p.name for p in (tmp_path / "pred").iterdir()} >= {"q1.pdb", "q2.pdb", "predictions.json", "summary.tsv"}
    record = run.predicted[0]
    assert record["mean_plddt"] is not None and record["ptm"] is not None
    summary = json.loads(run.summary_path.read_text())
    assert summary["confidence"]["plddt_head"] == "per_atom"


def test_finetune_config_describes_transformers_default_esmfold(tmp_path):
    """transformers' EsmFoldConfig defaults are facebook/esmfold_v1's: the fine-tuning config fits that folder too."""
    from esmfold_peft.fold.run.config import load_config
    from esmfold_peft.fold.run.esmfold_read import TRUNK_ARCHITECTURE, trunk_from_checkpoint
    from esmfold_peft.fold.run.hf_esmfold import check_esmfold_config, esmfold_model_config

    config = EsmConfig(**TINY_LM, is_folding_model=True).to_dict()
    check_esmfold_config(config, tmp_path / "config.json")  # transformers' own generic fields pass
    model_cfg = esmfold_model_config(config)
    v1 = trunk_from_checkpoint(model_cfg, tmp_path / "config.json")
    ours = load_config("esmfold_finetune").model.trunk.to_dict()
    assert {k: ours[k] for k in TRUNK_ARCHITECTURE} == {k: v1[k] for k in TRUNK_ARCHITECTURE}
    assert ours["structure_module"] == v1["structure_module"] and model_cfg["lddt_head_hid_dim"] == 128


# --- faults: one line naming the folder or file ------------------------------------------------------

def test_wrong_folders_are_named(folder, tmp_path):
    plain = tmp_path / "plain_esm"
    EsmModel(EsmConfig(**TINY_LM)).save_pretrained(plain)
    with pytest.raises(ArtifactError, match="is_folding_model is not true.*language model") as exc:
        load_esmfold_checkpoint(plain)
    one_line(exc, plain / "config.json")
    bare = tmp_path / "no_weights"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ArtifactError, match="no weights file") as exc:
        load_esmfold_checkpoint(bare)
    one_line(exc, bare)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="no config.json") as exc:
        load_esmfold_checkpoint(empty)
    one_line(exc, empty)
    run_like = tmp_path / "a_run"
    run_like.mkdir()
    (run_like / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    with pytest.raises(ArtifactError, match="training run.*--run") as exc:
        load_esmfold_checkpoint(run_like)
    one_line(exc, run_like)
    loose = empty / "esmfold.safetensors"  # weights without their config
    loose.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="no config.json beside it") as exc:
        load_esmfold_checkpoint(loose)
    one_line(exc, loose)


def edited(folder, tmp_path, name, edit):
    """A copy of `folder` whose config.json `edit(config)` changed."""
    import shutil

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["esmfold_config"]["trunk"].update(use_flash=True), "esmfold_config.trunk.use_flash"),
    (lambda c: c["esmfold_config"]["trunk"]["structure_module"].update(c_s=16),
     "esmfold_config.trunk.structure_module.c_s"),
    (lambda c: c["esmfold_config"].update(bypass_lm=True), "esmfold_config.bypass_lm"),
    (lambda c: c["esmfold_config"].update(use_esm_attn_map=True), "esmfold_config.use_esm_attn_map"),
    (lambda c: c.update(vocab_list=c["vocab_list"][::-1]), "vocab_list"),
])
def test_unknown_and_unsupported_fields_are_refused_by_name(folder, tmp_path, edit, field):
    copy = edited(folder, tmp_path, "edited", edit)
    with pytest.raises(ArtifactError) as exc:
        load_esmfold_checkpoint(copy)
    assert field in one_line(exc, copy / "config.json")


def test_generic_transformers_fields_are_ignored(folder, tmp_path):
    copy = edited(folder, tmp_path, "generic", lambda c: c["esmfold_config"]["trunk"].update(
        num_beams=4, torchscript=False, tokenizer_class=None))
    load_esmfold_checkpoint(copy)


def test_weights_that_do_not_fit_are_named(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = edited(folder, tmp_path, "damaged", lambda c: None)
    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    del state["trunk.blocks.1.mlp_seq.mlp.1.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    (copy / "model.safetensors.sha256").unlink(missing_ok=True)
    with pytest.raises(ArtifactError, match="missing keys: trunk.blocks.1.mlp_seq.mlp.1.weight") as exc:
        load_esmfold_checkpoint(copy, lm=str(folder))
    one_line(exc, copy)
    cfg_only = edited(folder, tmp_path, "one_block", lambda c: c["esmfold_config"]["trunk"].update(num_blocks=1))
    with pytest.raises(ArtifactError, match="unexpected keys: trunk.blocks.1") as exc:
        load_esmfold_checkpoint(cfg_only)
    one_line(exc, cfg_only)


# --- the Hugging Face ESM language model: config fields that change the forward ------------------------

def write_hf_esm(folder, mask_token: bool = False, **overrides):
    config = EsmConfig(**{**TINY_LM, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides})
    torch.manual_seed(3)
    EsmModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("token_dropout", [True, False])
@pytest.mark.parametrize("layer_norm_eps", [1e-5, 1e-3])
def test_lm_token_dropout_and_layer_norm_eps_as_transformers(tmp_path, token_dropout, layer_norm_eps):
    folder = write_hf_esm(tmp_path / "esm", token_dropout=token_dropout, layer_norm_eps=layer_norm_eps)
    ours, _, _ = load_language_model({"path": str(folder), "name": ""})
    assert ours.token_dropout is token_dropout
    theirs = EsmModel.from_pretrained(folder).eval()
    toks = torch.tensor([[0, 5, 6, 32, 8, 9, 10, 11, 2, 1], [0, 5, 6, 7, 8, 9, 2, 1, 1, 1]])  # a <mask>, padding
    with torch.no_grad():
        a = ours.eval()(toks, repr_layers=[ours.num_layers])["representations"][ours.num_layers]
        b = theirs(toks, attention_mask=toks != 1).last_hidden_state
    keep = toks != 1
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-4, atol=1e-4)


def test_lm_token_dropout_matters(tmp_path):
    on, _, _ = load_language_model({"path": str(write_hf_esm(tmp_path / "on", token_dropout=True)), "name": ""})
    off, _, _ = load_language_model({"path": str(write_hf_esm(tmp_path / "off", token_dropout=False)), "name": ""})
    toks = torch.tensor([[0, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        a = on.eval()(toks, repr_layers=[2])["representations"][2]
        b = off.eval()(toks, repr_layers=[2])["representations"][2]
    assert (a - b).abs().max() > 1e-2  # the 0.88 embedding scale of token dropout


@pytest.mark.parametrize("overrides, field", [
    ({"position_embedding_type": "absolute"}, "position_embedding_type"),
    ({"emb_layer_norm_before": True}, "emb_layer_norm_before"),
    ({"rope_theta": 5000.0}, "rope_theta"),
    ({"mask_token_id": 31}, "mask_token_id"),
])
def test_lm_fields_that_fair_esm_cannot_run_are_refused_by_name(tmp_path, overrides, field):
    folder = write_hf_esm(tmp_path / "esm", **overrides)
    with pytest.raises(LanguageModelError) as exc:
        load_hf_esm(folder)
    text = one_line(exc, folder)
    assert field in text


# --- writing: a folder transformers loads ----------------------------------------------------------

def adapted(folder, scope):
    """Our model from `folder` with a random-valued LoRTA adapter (`scope`: trunk or both)."""
    from esmfold_peft.adapters import get_adapter_set
    from esmfold_peft.fold.model.build import build_model

    cfg = config_from_checkpoint(folder)
    cfg.adapter.method, cfg.adapter.rank, cfg.adapter.scope = "lorta", 2, scope
    model = build_model(cfg).eval()
    init_from_checkpoint(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".peft." in name:
                p.copy_(0.3 * torch.randn_like(p))
    assert get_adapter_set(model.trunk) is not None
    return model, cfg


def test_export_round_trip_through_transformers(folder, tmp_path):
    from esmfold_peft.adapters import get_adapter_set
    from esmfold_peft.fold.run.esmfold_write import export_hf_esmfold

    model, cfg = adapted(folder, "both")
    before = predict(model)
    out = tmp_path / "exported_hf"
    written = export_hf_esmfold(model, cfg, out)
    assert written["adapters_merged"] == ["trunk", "language model"] and written["esm_type"] is None
    assert not get_adapter_set(model.trunk).merged
    torch.testing.assert_close(before["positions"], predict(model)["positions"], rtol=0, atol=0)
    theirs, info = EsmForProteinFolding.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same(before, predict(theirs.eval()))  # merged in float64, rounded once
    again, _ = load_esmfold_checkpoint(out)
    assert_same(before, predict(again))
    with pytest.raises(UserError, match="not a folder") as exc:
        export_hf_esmfold(model, cfg, out / "model.safetensors")
    one_line(exc, out)


def test_export_script_writes_a_folder(tiny_lorta_run, tmp_path, capsys):
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.runtime.errors import EXIT_OK, EXIT_USAGE
    from fold_fixtures import load_script

    script = load_script("export_esmfold")
    out = tmp_path / "run_hf"
    with pytest.raises(SystemExit):  # --lm-out is for the fair-esm file
        script.main(["--run", str(tiny_lorta_run), "--format", "hf", "--out", str(out), "--lm-out", "x.pt"])
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    assert script.main(["--run", str(tiny_lorta_run), "--format", "hf", "--out", str(tmp_path / "a_file")]) == \
        EXIT_USAGE
    assert "writes a folder" in capsys.readouterr().err
    assert script.main(["--run", str(tiny_lorta_run), "--format", "hf", "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"--esmfold {out}" in printed and "language model adapter merged" in printed
    run_model, _ = load_trained_model(tiny_lorta_run)
    theirs = EsmForProteinFolding.from_pretrained(out).eval()
    assert_same(predict(run_model.eval()), predict(theirs))


def test_a_run_config_takes_the_folder_as_init_from(folder):
    """A new run's model.init_from may name the folder: the config resolves it to the weights file it records."""
    from esmfold_peft.fold.run.resolve import fill_defaults

    cfg = config_from_checkpoint(folder)
    cfg.model.init_from = str(folder)
    fill_defaults(cfg)
    assert cfg.model.init_from == str(folder / "model.safetensors")
    cfg.model.init_from = str(folder.parent)  # a folder that is no ESMFold: named in one line
    with pytest.raises(ArtifactError) as exc:
        fill_defaults(cfg)
    one_line(exc, folder.parent)


def test_a_rotary_config_with_a_saved_position_table_is_rotary(tmp_path):
    """Older transformers saved an (unused) absolute position table beside rotary ESM-2 weights, as the demo's
    ESM-2 8M folder has: the config's rotary decides, and the outputs are transformers' own."""
    from safetensors.torch import load_file, save_file

    folder = write_hf_esm(tmp_path / "esm", token_dropout=True, layer_norm_eps=1e-5)
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    state = load_file(weights)
    state["embeddings.position_embeddings.weight"] = torch.zeros(TINY_LM.get("max_position_embeddings", 1026),
                                                                 TINY_LM["hidden_size"])
    save_file(state, weights)
    ours, _, _ = load_language_model({"path": str(folder), "name": ""})
    theirs = EsmModel.from_pretrained(folder).eval()  # rotary: the table is ignored
    toks = torch.tensor([[0, 5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        a = ours.eval()(toks, repr_layers=[ours.num_layers])["representations"][ours.num_layers]
        b = theirs(toks).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
