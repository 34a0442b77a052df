"""The dataset over a chain cache and the (seed, step)-deterministic weighted sampler."""

import pytest
import torch

from esmfold_peft.data.cache import build_cache
from esmfold_peft.data.dataset import ChainDataset, WeightedBatchSampler
from esmfold_peft.runtime.session import step_seed
from esmfold_peft.data.features import collate
from esmfold_peft.data.sources import directory_source


@pytest.fixture
def cache(tmp_path, pdb_lines):
    d = tmp_path / "structures"
    d.mkdir()
    (d / "long.pdb").write_text("\n".join(pdb_lines) + "\n")
    (d / "short.pdb").write_text("\n".join(pdb_lines[:21]) + "\n")
    return build_cache(directory_source(d), tmp_path / "cache", progress=False)


def test_dataset_features_and_crops(cache):
    full = ChainDataset(cache)
    assert len(full) == 2 and full.name(0) == "long_A"
    assert full[0]["aatype"].shape == (8,) and full[1]["aatype"].shape == (3,)
    cropped = ChainDataset(cache, crop_size=4)
    assert cropped[0]["aatype"].shape == (4,) and cropped[1]["aatype"].shape == (3,)
    assert torch.equal(cropped[0]["residue_index"], cropped[0]["residue_index"])  # int key: fixed crop
    starts = {int(cropped[(0, seed)]["residue_index"][0]) for seed in range(20)}
    assert len(starts) > 1  # the sampler's crop seeds move the window


def test_sampler_is_a_function_of_seed_and_step():
    a = WeightedBatchSampler([1, 2, 3, 4], batch_size=3, seed=5, num_steps=10)
    b = WeightedBatchSampler([1, 2, 3, 4], batch_size=3, seed=5, num_steps=10)
    assert list(a) == list(b) and len(a) == 10
    assert list(a) != list(WeightedBatchSampler([1, 2, 3, 4], batch_size=3, seed=6, num_steps=10))
    resumed = WeightedBatchSampler([1, 2, 3, 4], batch_size=3, seed=5, start_step=7, num_steps=3)
    assert list(resumed) == list(a)[7:]
    assert step_seed(5, 7) == step_seed(5, 7) != step_seed(7, 5)


def test_sampler_follows_weights():
    sampler = WeightedBatchSampler([0.0, 1.0, 3.0], batch_size=50, seed=0)
    drawn = [i for step in range(40) for i, _ in sampler.batch_keys(step)]
    counts = torch.bincount(torch.tensor(drawn), minlength=3)
    assert counts[0] == 0 and 2.5 < counts[2] / counts[1] < 3.5


def test_sampler_ranks_split_one_global_batch():
    whole = WeightedBatchSampler([1, 1, 1, 1, 1], batch_size=4, seed=3)
    ranks = [WeightedBatchSampler([1, 1, 1, 1, 1], batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for step in range(5):
        assert ranks[0].batch_keys(step) + ranks[1].batch_keys(step) == whole.batch_keys(step)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        WeightedBatchSampler([0.0, 0.0], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        WeightedBatchSampler([1.0], batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(TypeError, match="no length"):
        len(WeightedBatchSampler([1.0], batch_size=1, seed=0))


def test_dataloader_round_trip(cache):
    sampler = WeightedBatchSampler(cache.weights, batch_size=2, seed=0, num_steps=3)
    loader = torch.utils.data.DataLoader(ChainDataset(cache, crop_size=6), batch_sampler=sampler,
                                         collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["aatype"].shape[0] == 2 and batch["aatype"].shape[1] <= 6
        assert torch.equal(batch["mask"], batch["seq_mask"])
    again = list(torch.utils.data.DataLoader(ChainDataset(cache, crop_size=6), batch_sampler=sampler,
                                             collate_fn=collate))
    assert all(torch.equal(x["all_atom_positions"], y["all_atom_positions"]) for x, y in zip(batches, again))
