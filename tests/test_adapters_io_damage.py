"""Damaged or malformed adapter directories are refused with one line naming the file, and leave no trace."""

import json

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from esmfold_peft.adapters import (AdapterConfigError, AdapterLoadError, LoRAConfig, LoRTAConfig, add_adapter,
                                   get_adapter_set, has_adapters, load_adapter, read_adapter_config, save_adapter)
from esmfold_peft.runtime.artifacts import checksum_path
from esmfold_peft.runtime.errors import ArtifactError, ConfigError, UserError

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def saved(tmp_path):
    """An adapter directory written by save_adapter from a tiny ESM-2 (rank 4, alpha 16), perturbed."""
    torch.manual_seed(0)
    model = tm.fair_esm2(layers=2)
    ad = add_adapter(model, LoRTAConfig(rank=4, alpha=16))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def fresh_model():
    torch.manual_seed(0)
    return tm.fair_esm2(layers=2).eval()


def refuse(directory, match, where):
    """Loading fails with an AdapterLoadError naming `where`; the model is left exactly as it was."""
    model = fresh_model()
    before = tm.run(model, tm.tokens()).detach()
    with pytest.raises(AdapterLoadError, match=match) as info:
        load_adapter(model, directory)
    err = info.value
    assert isinstance(err, ArtifactError) and isinstance(err, UserError)
    assert str(where) in str(err) and "\n" not in str(err)
    assert not has_adapters(model) and not hasattr(model, "peft")
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either
    assert torch.equal(tm.run(model, tm.tokens()), before)
    return err


def test_error_classes():
    assert issubclass(AdapterLoadError, ArtifactError) and issubclass(AdapterLoadError, UserError)
    assert issubclass(AdapterConfigError, ConfigError) and issubclass(AdapterConfigError, ValueError)


def test_saved_weights_get_a_checksum_and_load(saved):
    assert checksum_path(saved / WEIGHTS).is_file()
    model = fresh_model()
    load_adapter(model, saved)
    assert has_adapters(model) and get_adapter_set(model).get().config.alpha == 16.0


# --- the weights file --------------------------------------------------------------------------------

def test_flipped_byte_with_sidecar_is_a_checksum_mismatch(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors alone would load it silently
    (saved / WEIGHTS).write_bytes(bytes(data))
    refuse(saved, "checksum mismatch", saved / WEIGHTS)


def test_truncated_with_sidecar_is_a_checksum_mismatch(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    refuse(saved, "checksum mismatch", saved / WEIGHTS)


@pytest.mark.parametrize("content,match", [
    (lambda data: data[: len(data) // 2], "damaged or not a safetensors file"),
    (lambda data: b"", "empty file"),
    (lambda data: b"\x00garbage, not a header" * 7, "damaged or not a safetensors file"),
    (lambda data: b"\xff" * 8 + data[8:], "damaged or not a safetensors file"),
], ids=["truncated", "empty", "garbage", "bad-header-length"])
def test_damaged_weights_without_sidecar(saved, content, match):
    checksum_path(saved / WEIGHTS).unlink()  # as an adapter written before checksums existed
    (saved / WEIGHTS).write_bytes(content((saved / WEIGHTS).read_bytes()))
    refuse(saved, match, saved / WEIGHTS)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    refuse(saved, "no such weight file", saved / WEIGHTS)


def test_damaged_checksum_record(saved):
    checksum_path(saved / WEIGHTS).write_text("{not json")
    refuse(saved, "damaged checksum record", checksum_path(saved / WEIGHTS))


def _rewrite_weights(saved, edit):
    from safetensors.torch import load_file

    tensors = load_file(str(saved / WEIGHTS))
    edit(tensors)
    checksum_path(saved / WEIGHTS).unlink(missing_ok=True)
    save_file(tensors, str(saved / WEIGHTS))


@pytest.mark.parametrize("bad,match", [
    (float("nan"), r"'lorta.A' holds 1 non-finite"),
    (float("inf"), r"'lorta.A' holds 1 non-finite"),
], ids=["nan", "inf"])
def test_non_finite_tensor(saved, bad, match):
    _rewrite_weights(saved, lambda t: t["lorta.A"].view(-1).__setitem__(5, bad))
    refuse(saved, match, saved / WEIGHTS)


def test_integer_tensor_is_refused_not_cast(saved):
    _rewrite_weights(saved, lambda t: t.__setitem__("lorta.C_H", torch.ones_like(t["lorta.C_H"], dtype=torch.int64)))
    refuse(saved, r"'lorta.C_H' has dtype int64; weights must be floating point", saved / WEIGHTS)


def test_wrong_shape_and_names_still_refused(saved):
    _rewrite_weights(saved, lambda t: t.__setitem__("lorta.C_L", torch.zeros(5, 4)))
    refuse(saved, r"lorta.C_L: saved \(5, 4\) vs expected \(2, 4\)", saved / WEIGHTS)
    _rewrite_weights(saved, lambda t: t.__setitem__("lorta.extra", torch.zeros(1)))
    refuse(saved, "unexpected tensors: lorta.extra", saved / WEIGHTS)


# --- the config file ---------------------------------------------------------------------------------

def _edit_config(saved, edit):
    """Apply `edit` to the saved config dict; it returns None (edited in place) or a replacement."""
    path = saved / CONFIG
    meta = json.loads(path.read_text())
    new = edit(meta)
    path.write_text(json.dumps(meta if new is None else new))


def replace(value):
    return lambda meta: value


def setting(value, *keys):
    def edit(meta):
        *parents, last = keys
        for k in parents:
            meta = meta[k]
        meta[last] = value
    return edit


def dropping(*keys):
    def edit(meta):
        *parents, last = keys
        for k in parents:
            meta = meta[k]
        del meta[last]
    return edit


CONFIG_FAULTS = {
    "a-list": (replace([{"method": "lorta"}]), "expected a JSON object, found a array"),
    "a-string": (replace("adapter"), "expected a JSON object, found a string"),
    "a-number": (replace(3), "expected a JSON object, found a integer"),
    "config-not-object": (setting([1, 2], "config"), "key 'config' should be a object"),
    "no-config": (dropping("config"), "lacks the key 'config'"),
    "method-not-string": (setting(7, "method"), "key 'method' should be a string"),
    "method-unknown": (setting("dora", "method"), "unknown adapter method 'dora'; known: lorta, lora"),
    "no-layout": (dropping("layout"), "needs exactly one of the keys 'layout' .* and 'layouts'"),
    "layout-and-layouts": (setting([], "layouts"), "needs exactly one of the keys 'layout' .* and 'layouts'"),
    "layouts-empty": (lambda m: {**{k: v for k, v in m.items() if k != "layout"}, "layouts": []},
                      "'layouts' should be a non-empty array"),
    "layouts-twice": (lambda m: {**{k: v for k, v in m.items() if k != "layout"}, "layouts": [m["layout"]] * 2},
                      "'layouts' names a family twice: fair-esm, fair-esm"),
    "layout-unknown-family": (setting("t5", "layout", "family"), "unknown layout family 't5'; known: fair-esm"),
    "layout-not-object": (setting("fair-esm", "layout"), "'layout' should be an object, found str"),
    "layout-lacks-heads": (dropping("layout", "n_heads"), "lacks the key 'n_heads'"),
    "layout-string-count": (setting("2", "layout", "n_layers"), "key 'n_layers' should be a integer"),
    "layout-bool-count": (setting(True, "layout", "d_model"), "key 'd_model' should be a integer"),
    "layout-float-kv": (setting(4.5, "layout", "n_kv_heads"), "'n_kv_heads' should be an integer or null"),
    "layout-unknown-key": (setting(True, "layout", "rotary"), "layout has unknown keys: rotary"),
    "layout-zero-heads": (setting(0, "layout", "n_heads"), "layout: n_heads must be positive"),
    "rank-string": (setting("four", "config", "rank"), "config: rank must be a positive integer"),
    "alpha-string": (setting("16", "config", "alpha"), "config: alpha must be a finite number"),
    "targets-string": (setting("qkvo", "config", "targets"), "config: targets must be a list"),
    "modes-unknown": (setting(["heads", "tokens"], "config", "modes"), "config: modes .* not understood"),
    "config-unknown-key": (setting(4, "config", "ranks"), "config: unknown lorta config keys: ranks"),
    "future-format": (setting(99, "format_version"), "format_version 99 is newer"),
    "format-not-int": (setting("1", "format_version"), "'format_version' should be an integer"),
}


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_malformed_config(saved, case):
    edit, match = CONFIG_FAULTS[case]
    _edit_config(saved, edit)
    refuse(saved, match, saved / CONFIG)
    with pytest.raises(AdapterLoadError):
        read_adapter_config(saved)


@pytest.mark.parametrize("text,match", [("", "empty file"), ("{\"method\": ", "not valid JSON"),
                                        ("\xff\xfe", "not valid JSON|cannot read")])
def test_unparsable_config(saved, text, match):
    (saved / CONFIG).write_text(text, encoding="latin-1")
    refuse(saved, match, saved / CONFIG)


def test_missing_config_and_directory(saved, tmp_path):
    (saved / CONFIG).unlink()
    refuse(saved, "no adapter_config.json", saved)
    refuse(tmp_path / "nowhere", "no adapter_config.json", tmp_path / "nowhere")


def test_layout_mismatch_names_the_config_and_leaves_no_set(saved):
    _edit_config(saved, setting(3, "layout", "n_layers"))
    refuse(saved, "n_layers: 3 vs 2", saved / CONFIG)


def test_failed_load_keeps_an_existing_adapter(saved):
    model = fresh_model()
    mine = add_adapter(model, LoRAConfig(rank=2), name="mine")
    _edit_config(saved, setting(5, "config", "rank"))
    with pytest.raises(AdapterLoadError, match="lorta.A: saved"):
        load_adapter(model, saved, name="other")
    aset = get_adapter_set(model)
    assert list(aset.adapters) == ["mine"] and aset.get() is mine and aset.active == "mine"


# --- alpha = rank by default; explicit alphas load as saved ------------------------------------------

@pytest.mark.parametrize("cls", [LoRTAConfig, LoRAConfig])
def test_alpha_defaults_to_rank_and_is_stored_explicitly(cls):
    cfg = cls(rank=6)
    assert cfg.alpha == 6.0 and cfg.scale == 1.0 and cfg.to_dict()["alpha"] == 6.0
    assert cls(rank=6, alpha=3).alpha == 3.0 and cls(rank=6, alpha=3).scale == 0.5


def test_explicit_alpha_in_old_configs_loads_identically(saved):
    meta = read_adapter_config(saved)
    assert meta["config"]["alpha"] == 16.0
    model = fresh_model()
    ad = load_adapter(model, saved)
    assert ad.config.alpha == 16.0 and ad.config.scale == 4.0


def test_config_without_alpha_means_alpha_equals_rank(saved):
    _edit_config(saved, dropping("config", "alpha"))
    ad = load_adapter(fresh_model(), saved)
    assert ad.config.alpha == 4.0
