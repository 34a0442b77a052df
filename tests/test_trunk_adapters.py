"""LoRTA on the folding trunk (adapter.scope trunk / both): training, export, loading, merging, counts."""

import pytest
import torch

from esmfold_peft.adapters import get_adapter_set, has_adapters
from esmfold_peft.fold.model.build import build_model, parameter_counts
from esmfold_peft.fold.run.checkpoint import load_trained_model
from esmfold_peft.fold.run.esmfold_read import init_from_checkpoint
from esmfold_peft.runtime.errors import EXIT_OK
from esmfold_peft.fold.train import seed_everything, train_model
from esmfold_peft.runtime.errors import ArtifactError, ConfigError, UserError
from fold_fixtures import tiny_run_config, write_esmfold_checkpoint


def frozen_trunk_config(tmp_path, scope, steps=2):
    """Fine-tuning a pretrained ESMFold (here a tiny one in fair-esm's format): only adapters train."""
    cfg = tiny_run_config(tmp_path, adapter="lorta", steps=steps, rank=2)
    cfg.adapter.scope = scope
    cfg.model.trainable = ""
    cfg.model.init_from = str(write_esmfold_checkpoint(cfg, tmp_path / "esmfold_tiny.pt"))
    return cfg


@pytest.mark.parametrize("scope", ["trunk", "both"])
def test_only_the_adapters_train_and_their_count_is_the_formula(tmp_path, scope):
    cfg = frozen_trunk_config(tmp_path, scope)
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.peft.", "esm.peft.")) for n in trainable)
    assert has_adapters(model.trunk) and has_adapters(model.esm) == (scope == "both")
    t = cfg.model.trunk
    blocks, r = t.num_blocks, cfg.adapter.rank
    seq = r * (t.sequence_state_dim + t.sequence_head_width + t.sequence_state_dim // t.sequence_head_width
               + blocks + 4)
    tri = r * (t.pairwise_state_dim + t.pairwise_head_width + t.pairwise_state_dim // t.pairwise_head_width
               + 2 * blocks + 4)
    trunk_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("trunk.peft."))
    assert trunk_params == seq + tri
    assert parameter_counts(model)["adapter"] == sum(p.numel() for n, p in model.named_parameters() if ".peft." in n)


def test_trunk_adapter_trains_exports_and_loads_back(tmp_path):
    cfg = frozen_trunk_config(tmp_path, "both", steps=3)
    seed_everything(cfg.train.seed)  # as the trainer does right before it builds the model
    initial = build_model(cfg)
    init_from_checkpoint(initial, cfg)
    before = initial.state_dict()
    status, model = train_model(cfg, tmp_path / "run", progress=False)
    assert status == EXIT_OK
    after = model.state_dict()
    moved = [k for k in after if k.startswith("trunk.peft.") and not torch.equal(after[k], before[k])]
    assert moved  # the trunk's factors learned
    frozen = [k for k in after if k.startswith("trunk.blocks.") and ".peft." not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # base trunk untouched
    assert (tmp_path / "run" / "trunk_adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    loaded, _ = load_trained_model(tmp_path / "run")
    aa = torch.randint(0, 20, (1, 14))
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model(aa, num_recycles=0)["positions"]
        b = loaded(aa, num_recycles=0)["positions"]
        torch.testing.assert_close(a, b)
        get_adapter_set(loaded.trunk).merge()  # merged trunk adapter: the same function
        torch.testing.assert_close(loaded(aa, num_recycles=0)["positions"], a, rtol=1e-4, atol=1e-4)


def test_a_frozen_trunk_needs_a_pretrained_esmfold(tmp_path):
    cfg = tiny_run_config(tmp_path, adapter="lorta")
    cfg.adapter.scope, cfg.model.trainable = "trunk", "heads"
    with pytest.raises(ConfigError, match="model.init_from names no pretrained ESMFold"):
        train_model(cfg, tmp_path / "run", progress=False)


def test_scope_needs_an_adapter_method(tmp_path):
    cfg = tiny_run_config(tmp_path, adapter="none")
    cfg.adapter.scope = "trunk"
    with pytest.raises(ConfigError, match="adapter.scope=trunk needs adapter.method lorta or lora"):
        train_model(cfg, tmp_path / "run", progress=False)


def test_predict_merges_the_trunk_adapter_after_checking_it(tmp_path):
    from esmfold_peft.fold.predict import merge_adapter_checked

    cfg = frozen_trunk_config(tmp_path, "both")
    model = build_model(cfg).eval()
    for part in (model.esm, model.trunk):  # nonzero updates: the zero-initialised factors get values
        for name, p in get_adapter_set(part).named_parameters():
            torch.nn.init.normal_(p, std=0.05)
    check, merged = merge_adapter_checked(model, ["MKTAYIAKQR", "GSHMLEDP"], torch.device("cpu"), num_recycles=0)
    assert check.ok and get_adapter_set(model.trunk).merged and get_adapter_set(model.esm).merged


def test_fine_tuning_runs_keep_only_what_trains_and_rebuild_the_rest(tmp_path):
    """Checkpoints and the exported model of a run started from model.init_from hold no frozen trunk tensor."""
    import shutil

    from esmfold_peft.fold.run.checkpoint import PRETRAINED_RECORD, read_checkpoint
    from esmfold_peft.runtime.artifacts import load_safetensors

    cfg = frozen_trunk_config(tmp_path, "both", steps=3)
    cfg.train.ckpt_every = 1
    status, model = train_model(cfg, tmp_path / "run", progress=False)
    assert status == EXIT_OK
    run = tmp_path / "run"
    saved = read_checkpoint(run / "checkpoints" / "last.pt")["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and all(".peft." in k for k in saved)  # nothing frozen went in
    assert load_safetensors(run / "model" / "fold_model.safetensors") == {}  # no fold tensor trained
    assert (run / "model" / PRETRAINED_RECORD).is_file()

    aa = torch.randint(0, 20, (1, 14), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        expected = model(aa, num_recycles=0)["positions"]
        for source in (None, run / "checkpoints" / "last.pt"):  # exported model, then the training checkpoint
            loaded, _ = load_trained_model(run, checkpoint=source, use_ema=False)
            torch.testing.assert_close(loaded.eval()(aa, num_recycles=0)["positions"], expected)

    # the pretrained file moved: named, and found again with model.init_from
    moved = tmp_path / "elsewhere.pt"
    shutil.move(cfg.model.init_from, moved)
    with pytest.raises(UserError, match="--set model.init_from=PATH"):
        load_trained_model(run)
    loaded, _ = load_trained_model(run, overrides=[f"model.init_from={moved}"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(aa, num_recycles=0)["positions"], expected)

    # another file in its place: refused by its checksum, from the export and from the checkpoint
    write_esmfold_checkpoint(cfg, moved, seed=6)
    for source in (None, run / "checkpoints" / "last.pt"):
        with pytest.raises(ArtifactError, match="not the pretrained ESMFold"):
            load_trained_model(run, checkpoint=source, overrides=[f"model.init_from={moved}"])


def test_a_fine_tuning_run_resumes_from_its_slim_checkpoint_exactly(tmp_path):
    from esmfold_peft.fold.run.resolve import resume_run_config

    straight_cfg = frozen_trunk_config(tmp_path / "a", "both", steps=4)
    status, straight = train_model(straight_cfg, tmp_path / "a" / "run", progress=False)
    assert status == EXIT_OK
    cfg = frozen_trunk_config(tmp_path / "b", "both", steps=2)
    cfg.train.ckpt_every = 1
    assert train_model(cfg, tmp_path / "b" / "run", progress=False)[0] == EXIT_OK
    resumed_cfg = resume_run_config(tmp_path / "b" / "run", ["train.steps=4"])
    status, resumed = train_model(resumed_cfg, tmp_path / "b" / "run", resume=True, progress=False)
    assert status == EXIT_OK
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".peft." in k)


def test_confidence_heads_train_with_the_adapters_and_travel_with_the_run(tmp_path):
    """model.trainable=confidence: the pLDDT head trains at optim.confidence_lr beside the adapters, counts as
    trainable, is kept in the slim run's files and in the fair-esm export; the rest of the model stays frozen."""
    from esmfold_peft.fold.run.esmfold_read import load_esmfold_checkpoint
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint
    from esmfold_peft.fold.train import param_groups
    from esmfold_peft.runtime.artifacts import load_safetensors

    cfg = frozen_trunk_config(tmp_path, "both", steps=3)
    cfg.model.trainable, cfg.optim.confidence_lr = "confidence", 1e-3
    seed_everything(cfg.train.seed)
    initial = build_model(cfg)
    init_from_checkpoint(initial, cfg)
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith("lddt_head.")}
    assert heads and trainable == heads | {n for n in trainable if ".peft." in n}  # pTM head: loss.tm.weight 0
    counts = parameter_counts(initial)
    assert counts["trunk_and_heads"] == sum(p.numel() for n, p in initial.named_parameters() if n in heads)
    groups = param_groups([(n, p) for n, p in initial.named_parameters() if p.requires_grad], cfg)
    assert [g.get("lr") for g in groups] == [None, 1e-3] and len(groups[1]["params"]) == len(heads)

    status, model = train_model(cfg, tmp_path / "run", progress=False)
    assert status == EXIT_OK
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in heads)  # the head learned
    assert all(torch.equal(after[k], before[k]) for k in after
               if k.startswith(("trunk.blocks.", "distogram_head.", "ptm_head.")) and ".peft." not in k)
    saved = load_safetensors(tmp_path / "run" / "model" / "fold_model.safetensors")
    assert set(saved) == heads  # the slim run keeps the trained head, nothing frozen
    loaded, _ = load_trained_model(tmp_path / "run")
    aa = torch.randint(0, 20, (1, 14), generator=torch.Generator().manual_seed(4))
    model.eval(), loaded.eval()
    with torch.no_grad():
        expected = model(aa, num_recycles=0)
        torch.testing.assert_close(loaded(aa, num_recycles=0)["plddt"], expected["plddt"])
        out = tmp_path / "exported.pt"
        export_esmfold_checkpoint(loaded, cfg, out, esm_type="esm2_8M", lm_out=tmp_path / "lm.pt")
        exported, _ = load_esmfold_checkpoint(out, lm=str(tmp_path / "lm.pt"))
        torch.testing.assert_close(exported.eval()(aa, num_recycles=0)["plddt"], expected["plddt"],
                                   rtol=1e-4, atol=1e-3)  # adapters merged in the export, the trained head kept
