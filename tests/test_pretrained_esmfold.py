"""Starting from a pretrained ESMFold: fair-esm's checkpoint format, read safely, predicting what fair-esm predicts.

The checkpoints here are written in fair-esm's exact format: an OmegaConf `cfg` with the key layout of
`esmfold_3B_v1.pt` (reconstructed from fair-esm's ESMFoldConfig/FoldingTrunkConfig/StructureModuleConfig
dataclasses, small dimensions) and the state dict of a fair-esm `ESMFold` with random weights, without
the ESM-2 (`esm.*`) tensors. fair-esm's own loader builds its model from the same file, with its
ESM-2 3B replaced by a small random ESM-2 (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from torch import nn

import esmfold_peft.compat as compat  # fair-esm's dataclasses on Python >= 3.11
from esmfold_peft.fold.model.lm import load_fair_esm_checkpoint
from esmfold_peft.fold.model.esm_attention import disable_sdpa
from esmfold_peft.fold.run.esmfold_read import (ESM_TYPES, config_from_checkpoint, init_from_checkpoint,
                                          load_esmfold_checkpoint, load_esmfold_state, omegaconf_pickle_classes,
                                          read_esmfold_checkpoint, trunk_from_checkpoint)
from esmfold_peft.adapters import get_adapter_set
from esmfold_peft.runtime.errors import ArtifactError, ConfigError, UserError
from fold_fixtures import folding_inputs as inputs, one_line

import esm  # noqa: E402  (after compat)
from esm.esmfold.v1 import esmfold as fair_esmfold  # noqa: E402
from esm.esmfold.v1 import pretrained as fair_pretrained  # noqa: E402
from esm.esmfold.v1.trunk import FoldingTrunkConfig, StructureModuleConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

# fair-esm's loader, given an ESM-2 file without its contact-regression file, says so (contacts are unused here)
pytestmark = [pytest.mark.filterwarnings("ignore:Regression weights not found"),
              pytest.mark.usefixtures("one_thread")]  # tiny models: one torch thread (conftest.py)

COMPARED = ("positions", "frames", "angles", "states", "plddt", "ptm", "distogram_logits", "predicted_aligned_error",
            "lm_logits")


# --- fair-esm format writers -------------------------------------------------------------------

def write_tiny_esm2(path, layers=2, dim=64, heads=4, seed=0):
    """A small random ESM-2 as a fair-esm .pt, every tensor exactly representable in float16.

    fair-esm's ESMFold halves its LM (and `esm-fold --cpu-only` makes it float again): with
    float16-exact weights (as the released ESM-2 3B file has) both LMs hold the same numbers.
    """
    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads)
    state = {f"encoder.sentence_encoder.{k}": v.half().float() if v.is_floating_point() else v
             for k, v in model.state_dict().items() if not k.startswith("contact_head.regression")}
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                             token_dropout=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    return path


def tiny_model_cfg(num_blocks=2, esm_type="esm2_3B", **overrides) -> dict:
    """cfg["model"] with the layout of esmfold_3B_v1.pt's, from fair-esm's own dataclasses."""
    sm = StructureModuleConfig(c_s=16, c_z=8, c_ipa=8, c_resnet=8, no_heads_ipa=2, no_qk_points=2, no_v_points=3,
                               no_blocks=2)
    trunk = FoldingTrunkConfig(num_blocks=num_blocks, sequence_state_dim=32, pairwise_state_dim=16,
                               sequence_head_width=16, pairwise_head_width=8, max_recycles=2, structure_module=sm)
    cfg = {"_name": "ESMFoldConfig", "esm_type": esm_type, "fp16_esm": True, "use_esm_attn_map": False,
           "esm_ablate_pairwise": False, "esm_ablate_sequence": False, "esm_input_dropout": 0,
           "trunk": dataclasses.asdict(trunk), "embed_aa": True, "bypass_lm": False, "lddt_head_hid_dim": 16}
    cfg.update(overrides)
    return cfg


def patch_fair_esm_lm(monkeypatch, lm_file):
    """fair-esm's ESMFold loads ESM-2 3B (fair-esm 2.0.0) or the one esm_type names (fair-esm main): both
    get the small LM instead."""
    fake = lambda *args: load_fair_esm_checkpoint(lm_file)  # noqa: E731  (a fresh model each call)
    monkeypatch.setattr(esm.pretrained, "esm2_t36_3B_UR50D", fake)
    registry = getattr(fair_esmfold, "esm_registry", None)
    if registry is not None:
        for key in list(registry):
            monkeypatch.setitem(registry, key, fake)


def write_esmfold(path, lm_file, monkeypatch, seed=1, **cfg_overrides):
    """A fair-esm ESMFold checkpoint: {"cfg": OmegaConf, "model": state dict without esm.*}, random weights."""
    patch_fair_esm_lm(monkeypatch, lm_file)
    cfg = OmegaConf.create({"model": tiny_model_cfg(**cfg_overrides),
                            "optimizer": {"lr": [1e-3], "adam_betas": [0.9, 0.98]}})
    torch.manual_seed(seed)
    model = fair_esmfold.ESMFold(esmfold_config=cfg.model)
    with torch.no_grad():  # openfold zero-initialises its final layers: make every tensor matter
        for name, p in model.named_parameters():
            if not name.startswith("esm."):
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("esm.")}
    torch.save({"cfg": cfg, "model": state}, path)
    return path


def fair_esm_model(path, lm_file, monkeypatch):
    """fair-esm's own ESMFold from the file (its `_load_model`), LM in float32 as `esm-fold --cpu-only` runs it."""
    patch_fair_esm_lm(monkeypatch, lm_file)
    with torch.serialization.safe_globals(omegaconf_pickle_classes()):  # torch >= 2.6 loads weights-only
        model = fair_pretrained._load_model(str(path))
    model.esm.float()
    return model.eval()


def predict(model, fair: bool, num_recycles=0):
    aatype, mask, residx = inputs()
    with torch.no_grad():
        if fair:
            return model(aatype, mask=mask, residx=residx, num_recycles=num_recycles)
        return model(aatype, mask, residx, num_recycles=num_recycles)


def assert_same(a, b, exact=True, atol=1e-4):
    for key in COMPARED:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture()
def lm_file(tmp_path):
    return write_tiny_esm2(tmp_path / "esm2_tiny.pt")


@pytest.fixture()
def ckpt(tmp_path, lm_file, monkeypatch):
    return write_esmfold(tmp_path / "esmfold_tiny.pt", lm_file, monkeypatch)


# --- the same predictions as fair-esm -----------------------------------------------------------

def test_predicts_exactly_what_fair_esm_predicts(ckpt, lm_file, monkeypatch):
    fair = fair_esm_model(ckpt, lm_file, monkeypatch)
    assert next(fair.esm.parameters()).dtype == torch.float32
    ours, cfg = load_esmfold_checkpoint(ckpt, lm={"path": str(lm_file), "sdpa": False})
    assert not ours.training and not any(p.requires_grad for p in ours.esm.parameters())
    for recycles in (None, 0):  # None: the file's max_recycles trunk passes (fair-esm's default)
        a, b = predict(fair, True, recycles), predict(ours, False, recycles)
        assert_same(a, b)
    assert a["positions"].std() > 0.1 and a["plddt"].std() > 0  # the comparison is not of constants
    assert cfg.model.trunk.num_blocks == 2 and cfg.model.trunk.structure_module.no_qk_points == 2
    assert cfg.model.lddt_head_hid_dim == 16 and cfg.model.init_from == str(ckpt)
    assert cfg.model.lm.path == str(lm_file) and cfg.adapter.method == "none"


def test_default_attention_path_agrees_to_float_rounding(ckpt, lm_file, monkeypatch):
    fair = fair_esm_model(ckpt, lm_file, monkeypatch)
    ours, _ = load_esmfold_checkpoint(ckpt, lm=lm_file)  # a Path; the LM's SDPA attention on
    # another summation order in the LM's attention, carried through a random trunk: 1e-3 (Å for positions)
    assert_same(predict(fair, True), predict(ours, False), exact=False, atol=1e-3)


def test_language_model_from_esm_type(ckpt, lm_file, monkeypatch, tmp_path):
    asked = []

    def hub(name):
        asked.append(name)
        return load_fair_esm_checkpoint(lm_file)

    monkeypatch.setattr(esm.pretrained, "load_model_and_alphabet", hub)
    ours, cfg = load_esmfold_checkpoint(ckpt)
    assert asked == ["esm2_t36_3B_UR50D"] and cfg.model.lm.name == "esm2_t36_3B_UR50D" and not cfg.model.lm.path
    fair = fair_esm_model(ckpt, lm_file, monkeypatch)
    disable_sdpa(ours.esm)  # fair-esm's own attention: the same model gives the same bits (SDPA: tested below)
    assert_same(predict(fair, True), predict(ours, False))
    # a structure-module-only checkpoint (0 folding blocks) of the 8M ESM-2, by fair-esm's own registry name
    sm_only = write_esmfold(tmp_path / "esmfold_structure_module_only_8M.pt", lm_file, monkeypatch, num_blocks=0,
                            esm_type="esm2_8M")
    ours, cfg = load_esmfold_checkpoint(sm_only)
    assert asked[-1] == ESM_TYPES["esm2_8M"] == "esm2_t6_8M_UR50D_500K"
    disable_sdpa(ours.esm)
    assert_same(predict(fair_esm_model(sm_only, lm_file, monkeypatch), True), predict(ours, False))
    ours, _ = load_esmfold_checkpoint(sm_only, lm="esm2_t6_8M_UR50D")  # a name overrides esm_type's
    assert asked[-1] == "esm2_t6_8M_UR50D"


def test_plain_dict_cfg_loads_too(ckpt, lm_file, tmp_path):
    data = torch.load(ckpt, weights_only=False)
    plain = tmp_path / "plain.pt"
    torch.save({"cfg": OmegaConf.to_container(data["cfg"]), "model": data["model"]}, plain)
    a, _ = load_esmfold_checkpoint(ckpt, lm=lm_file)
    b, _ = load_esmfold_checkpoint(plain, lm=lm_file)
    assert_same(predict(a, False), predict(b, False))


# --- openfold >= 2.0's IPA point-projection names ------------------------------------------------

def rename_ipa_points(state: dict, to_new: bool) -> dict:
    out = {}
    for k, v in state.items():
        for proj in ("linear_q_points", "linear_kv_points"):
            old, new = f"ipa.{proj}.", f"ipa.{proj}.linear."
            if to_new and old in k and new not in k:
                k = k.replace(old, new)
            elif not to_new and new in k:
                k = k.replace(new, old)
        out[k] = v
    return out


def test_ipa_point_names_map_both_ways():
    old = {"trunk.structure_module.ipa.linear_q_points.weight", "trunk.structure_module.ipa.linear_kv_points.bias",
           "trunk.structure_module.ipa.linear_q.weight"}
    new = {k.replace("_points.", "_points.linear.") for k in old}
    state_old = {k: torch.zeros(1) for k in old}
    state_new = {k: torch.zeros(1) for k in new}
    assert set(compat.match_ipa_point_names(state_old, new)) == new
    assert set(compat.match_ipa_point_names(state_new, old)) == old
    assert set(compat.match_ipa_point_names(state_old, old)) == old
    assert set(compat.match_ipa_point_names(state_new, new)) == new


def test_file_with_openfold2_names_loads_into_old_openfold(ckpt, lm_file, tmp_path):
    data = torch.load(ckpt, weights_only=False)
    renamed = rename_ipa_points(data["model"], to_new=True)
    assert any(".linear_q_points.linear.weight" in k for k in renamed)
    new_file = tmp_path / "openfold2_names.pt"
    torch.save({"cfg": data["cfg"], "model": renamed}, new_file)
    a, _ = load_esmfold_checkpoint(ckpt, lm=lm_file)
    b, _ = load_esmfold_checkpoint(new_file, lm=lm_file)
    assert_same(predict(a, False), predict(b, False))


class PointProjection(nn.Module):
    """openfold >= 2.0's layout of an IPA point projection: the Linear as `.linear` (same computation here)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_file_with_old_names_loads_into_openfold2_layout(ckpt, lm_file, tmp_path):
    reference, cfg = load_esmfold_checkpoint(ckpt, lm=lm_file)
    model, _ = load_esmfold_checkpoint(ckpt, lm=lm_file)
    ipa = model.trunk.structure_module.ipa
    ipa.linear_q_points = PointProjection(ipa.linear_q_points)
    ipa.linear_kv_points = PointProjection(ipa.linear_kv_points)
    assert "trunk.structure_module.ipa.linear_q_points.linear.weight" in model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("esm."):
                p.zero_()
    init_from_checkpoint(model, cfg)  # the file has the old names
    assert_same(predict(reference, False), predict(model, False))
    # and a file with the new names into the old layout was the test above; new into new:
    data = torch.load(ckpt, weights_only=False)
    new_file = tmp_path / "new.pt"
    torch.save({"cfg": data["cfg"], "model": rename_ipa_points(data["model"], to_new=True)}, new_file)
    _, state = read_esmfold_checkpoint(new_file)
    load_esmfold_state(model, state, new_file)
    assert_same(predict(reference, False), predict(model, False))


# --- files that are refused, each with its name --------------------------------------------------

def resave(ckpt, tmp_path, name, edit):
    data = torch.load(ckpt, weights_only=False)
    edit(data)
    out = tmp_path / name
    torch.save(data, out)
    return out


def test_damaged_and_foreign_files(ckpt, lm_file, tmp_path):
    raw = ckpt.read_bytes()
    cases = {
        "truncated.pt": lambda p: p.write_bytes(raw[: len(raw) // 2]),
        "garbage.pt": lambda p: p.write_bytes(b"not a checkpoint at all"),
        "empty.pt": lambda p: p.write_bytes(b""),
        "list.pt": lambda p: torch.save([1, 2, 3], p),
        "no_cfg.pt": lambda p: torch.save({"model": {"a": torch.zeros(1)}}, p),
        "no_model.pt": lambda p: torch.save({"cfg": OmegaConf.create({"model": tiny_model_cfg()})}, p),
        "no_trunk.pt": lambda p: torch.save({"cfg": {"model": {"esm_type": "esm2_3B"}}, "model": {}}, p),
        "model_not_dict.pt": lambda p: torch.save({"cfg": {"model": tiny_model_cfg()}, "model": [1]}, p),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ArtifactError) as exc:
            load_esmfold_checkpoint(path, lm=lm_file)
        one_line(exc, path)
    with pytest.raises(ArtifactError, match="no such checkpoint"):
        load_esmfold_checkpoint(tmp_path / "absent.pt", lm=lm_file)
    with pytest.raises(ArtifactError, match="ESM-2 language model checkpoint") as exc:
        load_esmfold_checkpoint(lm_file, lm=lm_file)
    one_line(exc, lm_file)


class NotAllowed:
    made = 0

    def __setstate__(self, state):
        NotAllowed.made += 1


@dataclasses.dataclass
class StructuredModelConfig:
    esm_type: str = "esm2_3B"


def test_pickles_beyond_omegaconf_are_refused(ckpt, tmp_path):
    evil = resave(ckpt, tmp_path, "evil.pt", lambda d: d.update(extra=NotAllowed()))
    with pytest.raises(ArtifactError, match="NotAllowed") as exc:
        read_esmfold_checkpoint(evil)
    one_line(exc, evil)
    assert NotAllowed.made == 0
    structured = tmp_path / "structured.pt"  # a structured OmegaConf config pickles its dataclass
    torch.save({"cfg": OmegaConf.create({"model": OmegaConf.structured(StructuredModelConfig)}), "model": {}},
               structured)
    with pytest.raises(ArtifactError, match="StructuredModelConfig"):
        read_esmfold_checkpoint(structured)
    # the allow-list is scoped to our reader: torch's global weights-only list is unchanged
    assert not any("omegaconf" in getattr(c, "__module__", "") for c in torch.serialization.get_safe_globals())


def test_unexpected_missing_and_misshapen_keys_are_listed(ckpt, lm_file, tmp_path):
    extra = resave(ckpt, tmp_path, "extra.pt", lambda d: d["model"].update({"trunk.extra.weight": torch.ones(2)}))
    with pytest.raises(ArtifactError, match=r"unexpected keys: trunk\.extra\.weight") as exc:
        load_esmfold_checkpoint(extra, lm=lm_file)
    one_line(exc, extra)

    def drop(d):
        del d["model"]["trunk.blocks.1.seq_attention.proj.weight"]
        del d["model"]["lddt_head.3.bias"]

    missing = resave(ckpt, tmp_path, "missing.pt", drop)
    with pytest.raises(ArtifactError, match="missing keys: ") as exc:
        load_esmfold_checkpoint(missing, lm=lm_file)
    text = one_line(exc, missing)
    assert "trunk.blocks.1.seq_attention.proj.weight" in text and "lddt_head.3.bias" in text
    shaped = resave(ckpt, tmp_path, "shape.pt", lambda d: d["model"].update({"ptm_head.bias": torch.zeros(3)}))
    with pytest.raises(ArtifactError, match="ptm_head.bias"):
        load_esmfold_checkpoint(shaped, lm=lm_file)
    nan = resave(ckpt, tmp_path, "nan.pt", lambda d: d["model"]["embedding.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(ArtifactError, match="non-finite") as exc:
        load_esmfold_checkpoint(nan, lm=lm_file)
    one_line(exc, nan)


def test_config_faults_are_named(ckpt, lm_file, tmp_path):
    def set_model(**kw):
        return lambda d: d["cfg"]["model"].update(kw)

    unknown = resave(ckpt, tmp_path, "unknown_type.pt", set_model(esm_type="esm3_huge"))
    with pytest.raises(ArtifactError, match="esm3_huge"):
        load_esmfold_checkpoint(unknown)
    load_esmfold_checkpoint(unknown, lm=lm_file)  # an explicit LM is enough
    attn = resave(ckpt, tmp_path, "attn_map.pt", set_model(use_esm_attn_map=True))
    with pytest.raises(ArtifactError, match="use_esm_attn_map=True"):
        load_esmfold_checkpoint(attn, lm=lm_file)

    def trunk_field(d):
        d["cfg"]["model"]["trunk"]["wobble"] = 3

    with pytest.raises(ArtifactError, match="wobble"):
        load_esmfold_checkpoint(resave(ckpt, tmp_path, "trunk_field.pt", trunk_field), lm=lm_file)
    other_lm = write_tiny_esm2(tmp_path / "esm2_three_layers.pt", layers=3)
    with pytest.raises(ArtifactError, match="2 layers x 64.*has 3 layers x 64") as exc:
        load_esmfold_checkpoint(ckpt, lm=other_lm)
    one_line(exc, ckpt)


# --- a config initialised from the checkpoint ------------------------------------------------------

def finetune_cfg(ckpt, lm_file):
    from esmfold_peft.fold.run.config import base_config

    cfg = base_config()
    cfg.model.lm.name, cfg.model.lm.path = "", str(lm_file)
    cfg.model.trunk = trunk_from_checkpoint(tiny_model_cfg(), ckpt)
    cfg.model.lddt_head_hid_dim = 16
    cfg.model.init_from = str(ckpt)
    cfg.adapter.method, cfg.adapter.rank = "lorta", 2
    return cfg


def test_init_from_checkpoint_gives_the_pretrained_model(ckpt, lm_file, tmp_path):
    from esmfold_peft.fold.model.build import build_model

    reference, ref_cfg = load_esmfold_checkpoint(ckpt, lm=lm_file)
    cfg = finetune_cfg(ckpt, lm_file)
    assert cfg.model.trunk.to_dict() == ref_cfg.model.trunk.to_dict()
    model = build_model(cfg).eval()
    assert any(".peft." in k for k in model.state_dict())  # adapter tensors: not in the file, not missing
    init_from_checkpoint(model, cfg)
    assert_same(predict(reference, False), predict(model, False), exact=False)
    rebuilt = build_model(ref_cfg).eval()  # the loader's config rebuilds the same model
    init_from_checkpoint(rebuilt, ref_cfg)
    assert_same(predict(reference, False), predict(rebuilt, False))

    cfg.model.init_from = ""  # nothing to do
    init_from_checkpoint(model, cfg)


def test_init_from_checkpoint_refuses_a_config_of_another_shape(ckpt, lm_file, tmp_path):
    from esmfold_peft.fold.model.build import build_model

    cfg = finetune_cfg(ckpt, lm_file)
    cfg.model.trunk.num_blocks = 1
    cfg.model.trunk.structure_module.no_blocks = 3
    cfg.model.lddt_head_hid_dim = 8
    model = build_model(cfg)
    with pytest.raises(ConfigError) as exc:
        init_from_checkpoint(model, cfg)
    text = str(exc.value)
    for part in ("model.trunk.num_blocks=1 (checkpoint: 2)", "model.trunk.structure_module.no_blocks=3 (checkpoint: 2)",
                 "model.lddt_head_hid_dim=8 (checkpoint: 16)", str(ckpt)):
        assert part in text
    cfg = finetune_cfg(ckpt, lm_file)
    cfg.model.lm.path = str(write_tiny_esm2(tmp_path / "esm2_wide.pt", dim=32))
    with pytest.raises(ConfigError, match="model.lm"):
        init_from_checkpoint(build_model(cfg), cfg)


def test_finetune_config_describes_esmfold_v1():
    from esmfold_peft.fold.run.config import check_config, load_config

    cfg = load_config("esmfold_finetune")
    check_config(cfg)
    assert cfg.model.init_from == ""
    v1 = trunk_from_checkpoint({"trunk": dataclasses.asdict(FoldingTrunkConfig())}, "esmfold_3B_v1.pt")
    ours = cfg.model.trunk.to_dict()
    for key in ("num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width",
                "pairwise_head_width", "position_bins"):
        assert ours[key] == v1[key], key
    assert ours["structure_module"] == v1["structure_module"]
    assert cfg.model.lm.name == ESM_TYPES["esm2_3B"] and cfg.model.lddt_head_hid_dim == 128
    assert cfg.model.trainable == "confidence"  # the pLDDT head calibrates beside the adapters (docs/finetune.md)
    json.dumps(cfg.to_dict())  # storable as a run's config.json


def test_config_from_checkpoint_alone(ckpt, lm_file, tmp_path):
    cfg = config_from_checkpoint(ckpt, lm=str(lm_file))
    assert cfg.model.lm.path == str(lm_file) and cfg.model.trunk.max_recycles == 2
    assert isinstance(cfg.model.trunk.dropout, float)  # the file's 0 stored as the config's type
    untyped = resave(ckpt, tmp_path, "no_type.pt", lambda d: d["cfg"]["model"].pop("esm_type"))
    assert config_from_checkpoint(untyped).model.lm.name == "esm2_t36_3B_UR50D"  # what fair-esm 2.0.0 loads


def test_saved_openfold_constants_are_tolerated(ckpt, lm_file, tmp_path):
    from openfold.np import residue_constants as rc

    def add(d):
        d["model"]["trunk.structure_module.group_idx"] = torch.tensor(rc.restype_atom14_to_rigid_group)
        d["model"]["trunk.structure_module.default_frames"] = torch.tensor(rc.restype_rigid_group_default_frame)

    a, _ = load_esmfold_checkpoint(ckpt, lm=lm_file)
    b, _ = load_esmfold_checkpoint(resave(ckpt, tmp_path, "constants.pt", add), lm=lm_file)
    assert_same(predict(a, False), predict(b, False))


# --- the other way: our models written in fair-esm's format --------------------------------------

def adapted_model(ckpt, lm_file, scope, seed=3):
    """The checkpoint's model with a LoRTA adapter (rank 2) on `scope`, every factor random (a real update)."""
    from esmfold_peft.fold.model.build import build_model

    cfg = finetune_cfg(ckpt, lm_file)
    cfg.adapter.scope = scope
    cfg.model.lm.sdpa = False
    model = build_model(cfg).eval()
    init_from_checkpoint(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".peft." in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model, cfg


def test_export_round_trip_through_our_loader_and_fair_esm(ckpt, lm_file, monkeypatch, tmp_path):
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint

    model, cfg = adapted_model(ckpt, lm_file, "trunk")
    before = predict(model, False)
    plain, _ = load_esmfold_checkpoint(ckpt, lm={"path": str(lm_file), "sdpa": False})
    assert (before["positions"] - predict(plain, False)["positions"]).abs().max() > 0.01  # the adapter matters
    out = tmp_path / "exported.pt"
    written = export_esmfold_checkpoint(model, cfg, out, esm_type="esm2_8M")
    assert written["adapters_merged"] == ["trunk"] and written["lm_out"] is None
    assert (tmp_path / "exported.pt.sha256").is_file()
    assert_same(before, predict(model, False))  # the model itself is as it was: adapter active, weights restored
    assert not get_adapter_set(model.trunk).merged

    data = torch.load(out, weights_only=False)
    assert OmegaConf.is_config(data["cfg"]) and data["cfg"].model.esm_type == "esm2_8M"
    assert not any(k.startswith("esm.") or ".peft." in k for k in data["model"])
    ours, loaded_cfg = load_esmfold_checkpoint(out, lm={"path": str(lm_file), "sdpa": False})
    assert loaded_cfg.model.trunk.to_dict() == cfg.model.trunk.to_dict()
    assert loaded_cfg.model.lddt_head_hid_dim == cfg.model.lddt_head_hid_dim
    assert_same(before, predict(ours, False), exact=False)  # merged in float64, rounded once
    fair = fair_esm_model(out, lm_file, monkeypatch)
    assert_same(predict(ours, False), predict(fair, True))


def test_export_of_an_adapted_language_model_needs_lm_out(ckpt, lm_file, tmp_path):
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint

    model, cfg = adapted_model(ckpt, lm_file, "both")
    out = tmp_path / "both.pt"
    with pytest.raises(UserError, match="carries an adapter") as exc:
        export_esmfold_checkpoint(model, cfg, out, esm_type="esm2_8M")
    one_line(exc, out)
    assert not out.exists()
    written = export_esmfold_checkpoint(model, cfg, out, esm_type="esm2_8M", lm_out=tmp_path / "esm2_adapted.pt")
    assert written["adapters_merged"] == ["trunk", "language model"]
    ours, _ = load_esmfold_checkpoint(out, lm={"path": written["lm_out"], "sdpa": False})
    assert_same(predict(model, False), predict(ours, False), exact=False)
    base_lm, _ = load_esmfold_checkpoint(out, lm={"path": str(lm_file), "sdpa": False})  # the adapter was in the LM
    assert (predict(base_lm, False)["positions"] - predict(ours, False)["positions"]).abs().max() > 1e-3


def test_esm_type_from_the_language_model():
    from types import SimpleNamespace

    from esmfold_peft.fold.run.esmfold_write import esm_type_for

    esm2_8m = SimpleNamespace(num_layers=6, embed_dim=320)
    assert esm_type_for(esm2_8m, "esm2_t6_8M_UR50D") == "esm2_8M_270K"
    assert esm_type_for(esm2_8m, "esm2_t6_8M_UR50D_500K") == "esm2_8M"
    assert esm_type_for(esm2_8m, "") == "esm2_8M_270K"  # by shape: the publicly listed one
    assert esm_type_for(esm2_8m, "esm2_t36_3B_UR50D") == "esm2_8M_270K"  # a name of another shape is not trusted
    assert esm_type_for(SimpleNamespace(num_layers=36, embed_dim=2560), "") == "esm2_3B"
    with pytest.raises(UserError, match="2 layers x 64.*esm_type"):
        esm_type_for(SimpleNamespace(num_layers=2, embed_dim=64), "")


def test_export_script_on_a_trained_run(tiny_lorta_run, tmp_path, capsys):
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.runtime.errors import EXIT_OK, EXIT_USAGE
    from fold_fixtures import load_script

    script = load_script("export_esmfold")
    out = tmp_path / "run_esmfold.pt"
    assert script.main(["--run", str(tiny_lorta_run), "--out", str(out), "--esm-type", "esm2_8M"]) == EXIT_USAGE
    err = capsys.readouterr().err  # the run adapted its LM: the file alone would not be the run's model
    assert err.startswith(f"error: {out}: ") and "--lm-out" in err and err.count("\n") == 1 and not out.exists()
    lm_out = tmp_path / "esm2_run.pt"
    assert script.main(["--run", str(tiny_lorta_run), "--out", str(out), "--lm-out", str(lm_out)]) == EXIT_USAGE
    assert "esm_type" in capsys.readouterr().err  # a 2-layer, 32-wide LM is no ESM-2 fair-esm names
    assert not out.exists() and not lm_out.exists()
    assert script.main(["--run", str(tiny_lorta_run), "--out", str(out), "--lm-out", str(lm_out),
                        "--esm-type", "esm2_8M"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"--esmfold {out} --lm {lm_out}" in printed and "language model adapter merged" in printed
    run_model, _ = load_trained_model(tiny_lorta_run)
    exported, _ = load_esmfold_checkpoint(out, lm=str(lm_out))
    assert_same(predict(run_model.eval(), False), predict(exported, False), exact=False)
    # the file says how its heads were trained (here: pLDDT on Cα, pTM never), and prediction from it follows
    from esmfold_peft.fold.predict import predict_fasta
    from esmfold_peft.fold.run.confidence import RECORD_KEY, model_heads

    assert torch.load(out, weights_only=False)[RECORD_KEY] == {"plddt_head": "ca", "ptm_head_trained": False}
    assert (exported.confidence_record["plddt_head"], model_heads(exported).ptm) == ("ca", False)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">q\nMKTAYIAKQRQISFVKSHF\n")
    run = predict_fasta(fasta, None, tmp_path / "pred", esmfold=out, lm=lm_out, device="cpu", progress=False)
    record = run.predicted[0]
    assert record["ptm"] is None and record["pae"] is None and record["mean_plddt"] is not None
    summary = json.loads(run.summary_path.read_text())
    assert summary["confidence"]["plddt_head"] == "ca" and summary["confidence"]["ptm_head_trained"] is False


def test_a_damaged_confidence_record_is_named(ckpt, lm_file, tmp_path):
    from esmfold_peft.fold.run.confidence import RECORD_KEY

    assert load_esmfold_checkpoint(ckpt, lm=lm_file)[0].confidence_record is None  # Meta's files have none
    path = resave(ckpt, tmp_path, "bad_record.pt", lambda d: d.update({RECORD_KEY: {"plddt_head": "all"}}))
    with pytest.raises(ArtifactError, match="damaged 'esmfold_peft_confidence' entry") as exc:
        load_esmfold_checkpoint(path, lm=lm_file)
    assert str(path) in str(exc.value)
