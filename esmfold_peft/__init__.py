"""esmfold-peft: LoRTA / LoRA adapters for ESM-2 inside a retrainable ESMFold.

Sub-packages: `adapters` (the core, torch only), `fold` (the folding application), `data`
(structures in, features out), `eval` (LDDT-Cα and reports), `nlp` (a small harness showing the
core serves any transformer). `compat` holds every workaround for a dependency's bug.
"""

__version__ = "0.1.0"
