"""Tiny folding runs for tests: a tiny Hugging Face ESM checkpoint, a few small structures, a tiny trunk.

    cfg = tiny_run_config(tmp_path, adapter="lorta", steps=3)
    status = train(cfg, tmp_path / "run", progress=False)

Nothing is downloaded: the language model is a 2-layer ESM-2-shaped model written with transformers,
the structures are rigid copies of the real 8-residue 1AHS fragment from conftest.py (chained
into longer pieces), which is all the training mechanics need.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from conftest import FRAGMENT_PDB
from esmfold_peft.fold.run.config import base_config, structure_module_config, trunk_config

TINY_LM = dict(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
               pad_token_id=1, mask_token_id=32, max_position_embeddings=128, layer_norm_eps=1e-5)


def write_tiny_hf_esm(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide ESM-2-shaped Hugging Face checkpoint (safetensors + config.json)."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import EsmConfig, EsmForMaskedLM  # slow to import: only when the checkpoint is missing

    torch.manual_seed(seed)
    EsmForMaskedLM(EsmConfig(**TINY_LM)).save_pretrained(directory)
    return directory


def _rotation(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def synthetic_chain_pdb(copies: int, seed: int) -> str:
    """`copies` fragments placed end to end (each rigidly moved) as one chain A, numbered from 1."""
    atoms = [line for line in FRAGMENT_PDB.splitlines() if line.startswith("ATOM")]
    xyz = np.array([[float(a[30:38]), float(a[38:46]), float(a[46:54])] for a in atoms])
    first_ca, last_ca = xyz[1], xyz[-7]  # CA of residue 156 and of residue 163
    step = last_ca - first_ca + 3.8 * (last_ca - first_ca) / np.linalg.norm(last_ca - first_ca)
    lines, serial = [], 1
    for c in range(copies):
        rot = _rotation(seed * 100 + c) if c % 2 else np.eye(3)
        moved = (xyz - xyz.mean(0)) @ (0.2 * rot + 0.8 * np.eye(3)).T + xyz.mean(0) + c * step
        for a, (x, y, z) in zip(atoms, moved):
            resnum = int(a[22:26]) - 155 + 8 * c
            lines.append(f"{a[:6]}{serial:5d}{a[11:22]}{resnum:4d}{a[26:30]}{x:8.3f}{y:8.3f}{z:8.3f}{a[54:]}")
            serial += 1
    return "\n".join(lines) + "\nEND\n"


def write_structures(directory: Path, n: int, seed: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"s{seed}_{i}.pdb").write_text(synthetic_chain_pdb(copies=2 + i % 3, seed=seed + i))
    return directory


def tiny_run_config(tmp_path: Path, adapter: str = "lorta", steps: int = 3, rank: int = 2, seed: int = 0):
    """A complete training config that runs in about a second per few steps on CPU."""
    tmp_path = Path(tmp_path)
    cfg = base_config()
    cfg.name = "tiny"
    cfg.model.lm.name = ""
    cfg.model.lm.path = str(write_tiny_hf_esm(tmp_path / "tiny_esm"))
    cfg.model.trunk = trunk_config(num_blocks=1, c_s=32, c_z=16, seq_head_width=16, pair_head_width=8,
                                   structure_module=structure_module_config(c_s=32, c_z=16, no_blocks=2,
                                                                            no_heads_ipa=2, c_ipa=8, c_resnet=16,
                                                                            dropout_rate=0.1))
    cfg.adapter.method = adapter
    cfg.adapter.rank = rank
    cfg.loss.plddt.min_resolution = 0.0
    cfg.optim.warmup_steps = 2
    cfg.train.steps = steps
    cfg.train.crop_size = 16
    cfg.train.batch_size = 2
    cfg.train.effective_batch_size = 2
    cfg.train.max_recycles = 1
    cfg.train.log_every = 1
    cfg.train.val_every = 0
    cfg.train.ckpt_every = 0
    cfg.train.seed = seed
    cfg.train.num_threads = 1
    cfg.val.num_recycles = 0
    cfg.data.source = "dir"
    cfg.data.train_dir = str(write_structures(tmp_path / "train_pdb", 4, seed=1))
    cfg.data.val_dir = str(write_structures(tmp_path / "val_pdb", 2, seed=7))
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def write_tiny_config_file(tmp_path: Path, steps: int) -> Path:
    """A config file for scripts/train_fold.py --config that builds `tiny_run_config(tmp_path, steps=...)`."""
    tests = Path(__file__).resolve().parent
    path = Path(tmp_path) / "tiny_config.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tests)!r})\n"
        "from pathlib import Path\n"
        "from fold_fixtures import tiny_run_config\n"
        f"def get_config():\n    return tiny_run_config(Path({str(tmp_path)!r}), steps={steps})\n")
    return path


def write_esmfold_checkpoint(cfg, path: Path, seed: int = 5) -> Path:
    """A fair-esm-format ESMFold checkpoint of the model `cfg` builds (random trunk and heads, no LM), written
    by the project's exporter (`export_esmfold_checkpoint`). It stands for Meta's: without the exporter's record
    of how its heads were trained (Meta's files have none, and their heads are trained)."""
    from esmfold_peft.fold.model.build import build_model
    from esmfold_peft.fold.run.confidence import RECORD_KEY
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint
    from esmfold_peft.fold.train import seed_everything
    from esmfold_peft.runtime.artifacts import torch_save

    bare = cfg.copy_and_resolve_references()
    bare.adapter.method, bare.model.trainable, bare.model.init_from = "none", "trunk", ""
    seed_everything(seed)
    export_esmfold_checkpoint(build_model(bare), bare, path, esm_type="esm2_8M")
    data = torch.load(path, weights_only=False)  # our own file: its cfg is an OmegaConf object
    del data[RECORD_KEY]
    torch_save(data, Path(path))
    return Path(path)


@functools.lru_cache(maxsize=None)
def load_script(name: str):
    """A script of scripts/ as a module, loaded once per test session (its `main(argv)` is what the tests call)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses and pickling look the module up there
    spec.loader.exec_module(module)
    return module


def folding_inputs():
    """Parity inputs of the ESMFold comparisons: two chains, the second padded; an unknown residue (X = 20) and a
    chain break in the residue index. (aatype, mask, residue index), [2, 12] each."""
    g = torch.Generator().manual_seed(5)
    aatype = torch.randint(0, 20, (2, 12), generator=g)
    aatype[0, 3] = 20
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    aatype[1, 9:] = 0
    residx = torch.arange(12).expand(2, 12).clone()
    residx[0, 7:] += 512
    return aatype, mask, residx


def one_line(exc_info, path):
    """The error's text: one line that names `path`."""
    text = str(exc_info.value)
    assert str(path) in text and "\n" not in text, text
    return text
