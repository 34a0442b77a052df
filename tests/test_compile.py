"""model.compile: torch.compile of the trunk blocks and the LM layers gives the eager model's outputs and gradients.

Compiled runs use AOTAutograd with the min-cut partitioner, as inductor does (the same graph
capture, common-subexpression elimination and forward/backward split), and run the captured
graphs without code generation, so a test compiles in seconds; bench/compile_step.py runs
inductor itself and reports its differences from eager. The adapters' lifecycle (add, merge,
unmerge after compiling) is checked with dynamo's eager backend: what can go stale there is
dynamo's guards, not the generated code.
"""

import copy
import json

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from esmfold_peft.adapters import LoRTAConfig, add_adapter, get_adapter_set
from esmfold_peft.fold.model import build
from esmfold_peft.fold.run.config import USE_FREE, base_config, check_config
from esmfold_peft.fold.run.resolve import finish, read_run_config, resume_run_config, stored_form
from esmfold_peft.runtime.errors import ConfigError
from esmfold_peft.runtime.rundir import RunDir
from fold_fixtures import tiny_run_config

RANK = 3  # no other dimension of the tiny model is 3: a matmul with 3 output columns is an adapter's x·A


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CapturingBackend:
    """AOTAutograd with inductor's partitioner; keeps every forward graph and runs the graphs as they are."""

    def __init__(self):
        self.forward_graphs = []
        self.backend = aot_autograd(fw_compiler=self._forward, bw_compiler=self._run,
                                    partition_fn=min_cut_rematerialization_partition)

    def _forward(self, gm, example_inputs):
        self.forward_graphs.append(gm)
        return self._run(gm, example_inputs)

    @staticmethod
    def _run(gm, example_inputs):
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm.forward)

    def rank_projections(self) -> list:
        """Per forward graph: how many matrix products produce RANK columns (x·A, and o's x·K)."""
        mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return [sum(1 for n in g.graph.nodes if n.op == "call_function" and n.target in mm
                    and n.meta["val"].shape[-1] == RANK) for g in self.forward_graphs]


def tiny_model(tmp_path, scope="both", **model_keys):
    cfg = tiny_run_config(tmp_path, rank=RANK)
    cfg.adapter.scope = scope
    for key, value in model_keys.items():
        node, leaf = (cfg.model.lm, key[3:]) if key.startswith("lm_") else (cfg.model, key)
        node[leaf] = value
    torch.manual_seed(0)
    model = build.build_model(cfg)
    randomise_adapters(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trunk block's last layers start at zero (the block is the identity): make them count
        for name, p in model.named_parameters():
            if name.startswith("trunk.blocks.") and ".peft." not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, cfg


def randomise_adapters(model):
    """Nonzero factors everywhere (B starts at zero), so every factor has a gradient and the update matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".peft." in name or name.startswith("peft."):
                p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.6)


def factor_grads(model, prefix):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if n.startswith(prefix) and p.grad is not None}


def assert_close_grads(eager, compiled, rtol):
    assert eager and set(eager) == set(compiled)
    for name, g in eager.items():
        assert g.abs().max() > 0, name
        assert (compiled[name] - g).abs().max() <= rtol * g.abs().max(), name


# --- the key ------------------------------------------------------------------------------------------------

def test_model_compile_is_checked_and_off_by_default():
    cfg = base_config()
    assert cfg.model.compile == "none"
    cfg.model.compile = "fast"
    with pytest.raises(ConfigError, match="model.compile must be one of none, trunk, lm, both, got 'fast'"):
        check_config(cfg)


def test_model_compile_changes_at_resume_and_use_and_older_runs_read_as_none(tmp_path):
    cfg = finish(tiny_run_config(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    stored = stored_form(cfg, run)
    del stored["model"]["compile"]  # a run from before the key
    RunDir(run).write_config(stored)
    assert read_run_config(run).model.compile == "none"
    assert read_run_config(run, ["model.compile=both"], use_overrides=USE_FREE).model.compile == "both"
    assert resume_run_config(run, ["model.compile=trunk"]).model.compile == "trunk"
    with pytest.raises(ConfigError, match="model.compile"):
        resume_run_config(run, ["model.compile=everything"])
    assert "compile" not in json.loads((run / "config.json").read_text())["model"]  # reading wrote nothing


def test_compiled_blocks_keep_parameter_names_and_copies_run_their_own_weights(tmp_path):
    eager, _ = tiny_model(tmp_path, compile="none")
    model, _ = tiny_model(tmp_path, compile="both", checkpoint_blocks=True)
    assert build.compile_mode(model) == "both" and build.compile_mode(eager) == "none"
    assert all(map(build.is_compiled, [*model.trunk.blocks, *model.esm.layers]))
    assert list(model.state_dict()) == list(eager.state_dict())  # no `_orig_mod.`: checkpoints interchange
    clone = copy.deepcopy(model)
    for original, copied in zip(model.trunk.blocks, clone.trunk.blocks):
        assert copied.forward.args[1] is copied and original.forward.args[1] is original
    build.set_compile(model, "trunk")
    assert build.compile_mode(model) == "trunk" and not any(map(build.is_compiled, model.esm.layers))
    build.set_compile(model, "none")
    assert build.compile_mode(model) == "none" and "forward" not in model.trunk.blocks[0].__dict__
    with pytest.raises(ConfigError, match="model.compile"):
        build.set_compile(model, "all")


# --- same outputs and gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("sdpa,storage", [(True, "float32"), (False, "bfloat16")])
def test_compiled_lm_gives_eager_outputs_and_factor_gradients_with_x_a_shared(tmp_path, monkeypatch, sdpa, storage):
    capture = CapturingBackend()
    monkeypatch.setattr(build, "COMPILE_BACKEND", capture.backend)
    model, _ = tiny_model(tmp_path, scope="lm", lm_sdpa=sdpa, lm_storage_dtype=storage)
    aa, mask = torch.randint(0, 20, (2, 11)), torch.ones(2, 11)
    mask[1, 8:] = 0
    weights = None

    def run(mode):
        nonlocal weights
        build.set_compile(model, mode)
        model.zero_grad(set_to_none=True)
        rep = model.language_model_representations(aa, mask)
        if weights is None:  # fixed random weights: a loss whose gradient is not rounding noise
            weights = torch.randn(rep.shape, generator=torch.Generator().manual_seed(3))
        (rep.float() * weights).mean().backward()
        return rep.detach(), factor_grads(model, "esm.peft.")

    eager, eager_grads = run("none")
    compiled, compiled_grads = run("lm")
    tol = 1e-5 if storage == "float32" else 2e-2
    assert (compiled.float() - eager.float()).abs().max() <= tol * eager.float().abs().max()
    assert_close_grads(eager_grads, compiled_grads, tol)
    # per layer, the compiled forward computes x·A once for q, k and v (common-subexpression
    # elimination merges the hook's three products) and x·K once for o: the adapter's fast path
    counts = capture.rank_projections()
    assert counts and all(c == 2 for c in counts), counts


@pytest.mark.slow  # compiles a trunk block's forward and backward with checkpointing inside: ~20 s
def test_compiled_trunk_gives_eager_outputs_and_factor_gradients_with_checkpointing(tmp_path, monkeypatch):
    capture = CapturingBackend()
    monkeypatch.setattr(build, "COMPILE_BACKEND", capture.backend)
    model, cfg = tiny_model(tmp_path, scope="trunk", checkpoint_blocks=True)
    model.train()
    aa, mask = torch.randint(0, 20, (1, 10)), torch.ones(1, 10)

    def run(mode):
        build.set_compile(model, mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the structure module's dropout (eager in both runs)
        out = model(aa, mask, num_recycles=0)
        (out["s_s"].square().mean() + out["s_z"].square().mean() + 1e-3 * out["positions"].square().mean()).backward()
        return {k: out[k].detach() for k in ("s_s", "s_z", "positions")}, factor_grads(model, "trunk.peft.")

    eager, eager_grads = run("none")
    compiled, compiled_grads = run("trunk")
    for key, value in eager.items():
        assert (compiled[key] - value).abs().max() <= 1e-5 * value.abs().max(), key
    assert_close_grads(eager_grads, compiled_grads, 1e-5)
    # sequence attention (q, k, v fused in one Linear) and both triangle attentions: x·A once, x·K once
    assert capture.rank_projections() == [6]


# --- adapters changed after compiling ----------------------------------------------------------------------

def test_adapters_added_merged_or_unmerged_after_compiling_are_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "COMPILE_BACKEND", "eager")  # dynamo's guards are what could go stale
    cfg = tiny_run_config(tmp_path, adapter="none")
    cfg.model.compile = "lm"
    torch.manual_seed(0)
    model = build.build_model(cfg)  # as the exported-model loader: built bare, the adapter added later
    aa, mask = torch.randint(0, 20, (1, 9)), torch.ones(1, 9)

    def both():
        """(compiled, eager) LM representations for the model's current state."""
        with torch.no_grad():
            compiled = model.language_model_representations(aa, mask)
            build.set_compile(model, "none")
            eager = model.language_model_representations(aa, mask)
            build.set_compile(model, "lm")
        return compiled, eager

    base, _ = both()
    add_adapter(model.esm, LoRTAConfig(rank=RANK, alpha=RANK))
    randomise_adapters(model)
    adapted, adapted_eager = both()
    assert torch.equal(adapted, adapted_eager) and (adapted - base).abs().max() > 1e-3
    aset = get_adapter_set(model.esm)
    aset.merge()  # the hooks go, the weights change: a stale graph would add the update twice
    merged, merged_eager = both()
    assert torch.equal(merged, merged_eager) and (merged - adapted).abs().max() < 1e-4
    aset.unmerge()  # the hooks are back: without hook guards, the merged graph would run on (no update at all)
    unmerged, _ = both()
    assert (unmerged - adapted).abs().max() < 1e-4
