"""Mixed-adapter batches in the core (adapters/mixed.py, AdapterSet.mix/routed): each sample of one batch runs
with its own adapter, and its output equals running it alone with that adapter; `None` is the base model."""

import copy

import pytest
import torch

import tiny_models as tm
from esmfold_peft.adapters import AdapterError, LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set
from esmfold_peft.adapters.mixed import MixedAdapterError

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-4, atol=1e-4)  # float reassociation of batched vs single products


def perturb(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def with_adapters(model, configs):
    """`model` with one adapter per config (random nonzero factors), each named a0, a1, … and made mixable."""
    model.eval()
    for i, config in enumerate(configs):
        perturb(add_adapter(model, copy.deepcopy(config), name=f"a{i}"), seed=10 + i)
    aset = get_adapter_set(model)
    for name in list(aset.adapters):
        aset.mix(name)
    return aset


def solo(model, aset, toks, name):
    """The outputs with one adapter active for the whole batch (None: disabled), as the classic path runs."""
    with torch.no_grad():
        if name is None:
            with aset.disabled():
                return tm.run(model, toks)
        aset.set_active(name)
        return tm.run(model, toks)


def check_mixed_equals_solo(model, aset, toks, names):
    with torch.no_grad(), aset.routed(names):
        mixed = tm.run(model, toks)
    moved = 0.0
    base = solo(model, aset, toks, None)
    for b, name in enumerate(names):
        alone = solo(model, aset, toks[b:b + 1], name)
        torch.testing.assert_close(mixed[b:b + 1], alone, **TOL)
        if name is not None:
            moved = max(moved, float((alone - base[b:b + 1]).abs().max()))
    assert moved > 100 * TOL["atol"]  # the adapters visibly change the outputs, or this proves nothing


LORTA_MIX = [LoRTAConfig(rank=4, alpha=8), LoRTAConfig(rank=2, alpha=1, targets=("q", "v")),
             LoRTAConfig(rank=6, alpha=3)]
LORA_MIX = [LoRAConfig(rank=2, alpha=4), LoRAConfig(rank=4, alpha=4, targets=("q", "k", "v")),
            LoRAConfig(rank=1, alpha=2)]


@pytest.mark.parametrize("family", ["fair-esm", "hf-bert", "hf-llama-gqa"])
@pytest.mark.parametrize("configs", [LORTA_MIX, LORA_MIX], ids=["lorta", "lora"])
def test_each_sample_of_a_mixed_batch_equals_its_solo_run(family, configs):
    model = tm.FAMILIES[family]()
    aset = with_adapters(model, configs)
    toks = tm.tokens(batch=5, length=9)
    check_mixed_equals_solo(model, aset, toks, ["a0", None, "a2", "a1", "a0"])


def test_a_batch_of_one_adapter_equals_the_active_adapter_and_base_is_the_base():
    model = tm.fair_esm2()
    aset = with_adapters(model, LORTA_MIX[:1])
    toks = tm.tokens(batch=3)
    with torch.no_grad(), aset.routed(["a0"] * 3):
        mixed = tm.run(model, toks)
    torch.testing.assert_close(mixed, solo(model, aset, toks, "a0"), **TOL)
    with torch.no_grad(), aset.routed([None] * 3):
        assert torch.equal(tm.run(model, toks), solo(model, aset, toks, None))  # zeros add exactly nothing


def test_an_adapter_removed_from_the_set_stays_usable_in_mixed_batches():
    """A library keeps only the stacked copies: the module can go once it is mixed."""
    model = tm.fair_esm2()
    aset = with_adapters(model, LORTA_MIX[:2])
    toks = tm.tokens(batch=2)
    want = solo(model, aset, toks[:1], "a1")
    aset.remove("a1")
    with torch.no_grad(), aset.routed(["a1", None]):
        got = tm.run(model, toks)
    torch.testing.assert_close(got[:1], want, **TOL)
    aset.unmix("a1")
    with pytest.raises(MixedAdapterError, match="no resident adapter named 'a1'"):
        with aset.routed(["a1", None]):
            pass


def test_what_cannot_be_mixed_is_refused_by_name():
    model = tm.fair_esm2()
    aset = with_adapters(model, LORTA_MIX[:1])
    ablation = add_adapter(model, LoRTAConfig(rank=2, modes=("heads",)), name="ablation")
    with pytest.raises(MixedAdapterError, match="modes heads"):
        aset.mix("ablation", ablation)
    with pytest.raises(MixedAdapterError, match="LoRTA and LoRA"):
        aset.mix("lora", add_adapter(model, LoRAConfig(rank=2), name="lora"))
    aset.remove("lora")
    with pytest.raises(MixedAdapterError, match="batch axis"), torch.no_grad(), aset.routed(["a0", None, "a0"]):
        tm.run(model, tm.tokens(batch=2))  # ids for 3 samples, a batch of 2
    aset.set_active("a0")
    aset.merge()
    with pytest.raises(AdapterError, match="merged"), aset.routed(["a0", None]):
        pass


def test_one_adapter_for_the_whole_batch_needs_no_batch_axis_and_groups_split_a_batch():
    """A routed batch whose samples share one adapter runs inputs of any shape (a chunked forward); the
    split-by-adapter fallback runs one such forward per adapter and equals the gathered batch."""
    from esmfold_peft.adapters.mixed import groups_by_adapter

    model = tm.fair_esm2()
    aset = with_adapters(model, LORTA_MIX)
    toks = tm.tokens(batch=4)
    names = ["a1", None, "a1", "a2"]
    assert groups_by_adapter(names) == {"a1": [0, 2], None: [1], "a2": [3]}
    with torch.no_grad():
        with aset.routed(names):
            gathered = tm.run(model, toks)
        split = torch.empty_like(gathered)
        for name, rows in groups_by_adapter(names).items():
            with aset.routed([name] * len(rows)):
                split[rows] = tm.run(model, toks[rows])
        lin = model.layers[0].self_attn.q_proj
        x = torch.randn(3, 5, 7, lin.in_features)  # no axis of the batch's size: fine with one adapter
        with aset.routed(["a0"] * 4):
            routed = lin(x)
        aset.set_active("a0")
        classic = lin(x)
    torch.testing.assert_close(split, gathered, **TOL)
    torch.testing.assert_close(routed, classic, **TOL)


def test_the_stacks_are_the_only_copy_and_grow_as_adapters_arrive():
    """Slots double as adapters arrive, a larger rank widens every slot with zero columns, and a freed slot is
    reused: the outputs stay each adapter's own throughout."""
    model = tm.fair_esm2()
    aset = with_adapters(model, [LoRTAConfig(rank=2, alpha=2)])
    mixed = aset.mixed
    first = mixed.resident_bytes()
    for i, rank in enumerate((2, 2, 5)):  # a third slot doubles the stack; rank 5 widens it
        perturb(add_adapter(model, LoRTAConfig(rank=rank, alpha=rank), name=f"b{i}"), seed=30 + i)
        aset.mix(f"b{i}")
    stack = next(iter(mixed.stacks.values()))
    assert stack.tensors["A"].shape[0] >= 5 and stack.tensors["A"].shape[-1] == 5 and mixed.resident_bytes() > first
    aset.unmix("b0")
    perturb(add_adapter(model, LoRTAConfig(rank=3, alpha=3), name="c"), seed=40)
    assert aset.mix("c") == 2  # b0's freed slot
    toks = tm.tokens(batch=4)
    check_mixed_equals_solo(model, aset, toks, ["a0", "b1", "c", "b2"])
