"""Batches for training and validation: a map-style dataset over a chain cache and a resumable sampler.

Training order is a pure function of (seed, step): `WeightedBatchSampler.batch_keys(step)` seeds a
generator with (seed, step) alone, draws the step's chains by sampling weight (with replacement)
and one crop seed per chain. To resume exactly at step s, build the sampler with `start_step=s`;
nothing else (epoch counters, worker state) is involved. Use it as

    loader = DataLoader(ChainDataset(cache, crop_size=256), batch_sampler=sampler, collate_fn=collate)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from esmfold_peft.data.cache import ChainCache
from esmfold_peft.data.features import Features, chain_to_features, crop
from esmfold_peft.runtime.session import step_seed

# A dataset key: a chain index, or (chain index, crop seed) from WeightedBatchSampler.
Key = int | tuple[int, int]


class ChainDataset(torch.utils.data.Dataset):
    """Features of cached chains, cropped to `crop_size` residues when it is set.

    `dataset[i]` crops with a generator seeded by i (so validation crops are fixed);
    `dataset[(i, seed)]` crops with `seed` (the sampler's per-step crop seeds).
    """

    def __init__(self, cache: ChainCache, crop_size: int | None = None,
                 unknown_resolution: float = 0.0):
        self.cache = cache
        self.crop_size = crop_size
        self.unknown_resolution = unknown_resolution

    def __len__(self) -> int:
        return len(self.cache)

    def name(self, index: int) -> str:
        return self.cache.records[index].name

    def __getitem__(self, key: Key) -> Features:
        index, crop_seed = key if isinstance(key, tuple) else (key, key)
        features = chain_to_features(self.cache.load(index), self.unknown_resolution)
        if self.crop_size is None:
            return features
        return crop(features, self.crop_size, torch.Generator().manual_seed(crop_seed))


class WeightedBatchSampler(torch.utils.data.Sampler):
    """Yields, per step, `batch_size` keys (chain index, crop seed) drawn by sampling weight.

    With `world_size` > 1 every rank draws the same global batch of batch_size * world_size and
    takes its own contiguous slice, so ranks never need to talk. Runs `num_steps` steps from
    `start_step` (forever when num_steps is None).
    """

    def __init__(self, weights: Sequence[float], batch_size: int, seed: int, start_step: int = 0,
                 num_steps: int | None = None, rank: int = 0, world_size: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.numel() == 0 or not bool((self.weights >= 0).all()) or float(self.weights.sum()) <= 0:
            raise ValueError("sampling weights must be non-negative with a positive sum")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.num_steps = num_steps
        self.rank = rank
        self.world_size = world_size

    def batch_keys(self, step: int) -> list[tuple[int, int]]:
        """This rank's keys at `step`: a pure function of (seed, step, rank, world_size)."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        total = self.batch_size * self.world_size
        indices = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        crop_seeds = torch.randint(0, 2**62, (total,), generator=generator)
        lo = self.rank * self.batch_size
        return [(int(i), int(s)) for i, s in zip(indices[lo:lo + self.batch_size],
                                                 crop_seeds[lo:lo + self.batch_size])]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch_keys(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless WeightedBatchSampler (num_steps=None) has no length")
        return self.num_steps
