"""The adapter core: LoRTA and LoRA over any attention layout (imports torch and the runtime only).

    from esmfold_peft.adapters import LoRTAConfig, add_adapter, save_adapter, load_adapter
    add_adapter(model, LoRTAConfig(rank=8, alpha=16))      # base frozen, adapter trainable
    ...train...
    save_adapter(model, "out/adapter")                     # format="peft" for a LoRA: Hugging Face PEFT's
    get_adapter_set(model).merge()                         # inference at the base model's cost
"""

from .base import METHODS, PEFT_ATTR, Adapter, build_adapter, config_from_dict, is_adapted, is_adapter_param
from .config import AdapterConfigError, LoRAConfig, LoRTAConfig, parse_modes
from .inject import (AdapterError, AdapterSet, add_adapter, attach, freeze_base, get_adapter_set, has_adapters,
                     trainable_parameters, unload)
from .io import AdapterLoadError, is_peft_folder, load_adapter, read_adapter_config, save_adapter
from .layouts import ARCHITECTURES, MATRICES, AttentionLayout, LayoutError, architecture, detect_layout
from .lora import LoRA
from .lorta import LoRTA

__all__ = [
    "Adapter", "AdapterConfigError", "AdapterError", "AdapterLoadError", "AdapterSet", "ARCHITECTURES",
    "AttentionLayout", "LayoutError", "LoRA", "LoRAConfig", "LoRTA", "LoRTAConfig", "MATRICES", "METHODS",
    "add_adapter", "architecture", "attach", "build_adapter", "config_from_dict", "detect_layout",
    "freeze_base", "get_adapter_set", "has_adapters", "is_adapted", "is_adapter_param", "is_peft_folder", "load_adapter",
    "PEFT_ATTR", "parse_modes", "read_adapter_config",
    "save_adapter", "trainable_parameters", "unload",
]
