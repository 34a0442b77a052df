"""The adapter core: LoRTA and LoRA over any attention layout (imports torch only).

    from esmfold_peft.adapters import LoRTAConfig, add_adapter, save_adapter, load_adapter
    add_adapter(model, LoRTAConfig(rank=8, alpha=16))      # base frozen, adapter trainable
    ...train...
    save_adapter(model, "out/adapter")
    get_adapter_set(model).merge()                         # inference at the base model's cost
"""

from .config import AdapterConfigError, LoRAConfig, LoRTAConfig, config_from_dict
from .inject import (ADAPTER_CLASSES, AdapterError, AdapterSet, add_adapter, attach, freeze_base, get_adapter_set,
                     trainable_parameters, unload)
from .io import AdapterLoadError, load_adapter, read_adapter_config, save_adapter
from .layouts import (ARCHITECTURES, MATRICES, AttentionLayout, LayoutError, architecture,
                      detect_layout)
from .lora import LoRA
from .lorta import LoRTA


def build_adapter(config, layout: AttentionLayout, device=None):
    """An adapter module for a layout alone (no model), e.g. to count its parameters."""
    return ADAPTER_CLASSES[config.method](config, layout, device=device)


__all__ = [
    "AdapterConfigError", "AdapterError", "AdapterLoadError", "AdapterSet", "ARCHITECTURES",
    "AttentionLayout", "LayoutError", "LoRA", "LoRAConfig", "LoRTA", "LoRTAConfig", "MATRICES",
    "add_adapter", "architecture", "attach", "build_adapter", "config_from_dict", "detect_layout",
    "freeze_base", "get_adapter_set", "load_adapter", "read_adapter_config", "save_adapter",
    "trainable_parameters", "unload",
]
