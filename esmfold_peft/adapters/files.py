"""The files of an adapter folder and the one error for a folder that cannot be loaded.

    adapter_config.json          the config (ours, or PEFT's: then it has `peft_type`)
    adapter_model.safetensors    the tensors (+ `.sha256` sidecar when we wrote them)
    head.safetensors             a classification head trained beside the adapter (optional)
    head_config.json             what the head is for: task, labels, parameter shapes (optional)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from ..runtime.errors import ArtifactError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
BASE_METADATA = "esmfold_peft.base"  # the base record in a PEFT-format weights file's header


class AdapterLoadError(ArtifactError):
    """An adapter directory that cannot be loaded: missing, damaged, malformed or made for another model."""


def weights_metadata(path: Path) -> Dict[str, str]:
    """The string metadata of a (verified) safetensors file's header; {} when it has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def metadata_base(path: Path) -> Optional[dict]:
    """The base record stored in a PEFT-format weights file by `save_adapter(format="peft")`, if any."""
    text = weights_metadata(path).get(BASE_METADATA)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AdapterLoadError(path, f"header entry {BASE_METADATA!r} is not JSON ({exc})") from exc
