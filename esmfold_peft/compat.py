"""Every workaround for a dependency's bug, in one place, each with its reason.

Import this module (the application does it for you) before touching openfold or fair-esm's
ESMFold parts. Nothing here edits site-packages; each fix is applied at import time and is a no-op
when the dependency no longer needs it.

| dependency | problem | fix here |
|---|---|---|
| openfold 0.0.1 | `openfold.model.primitives` calls `importlib.util` without importing it, so it fails when imported before torch | import `importlib.util` and torch first |
| openfold 0.0.1 + Biopython >= 1.82 | `openfold.data.mmcif_parsing` imports `Bio.Data.SCOPData`, removed in 1.82 | alias a module with `protein_letters_3to1` from `PDBData` |
| fair-esm 2.0.0 on Python >= 3.11 | dataclass fields with mutable defaults in `esm/esmfold/v1/{trunk,esmfold}.py` raise `ValueError` at import | an import hook compiles those two modules with `field(default_factory=...)` |
| torch >= 2.6 | `torch.load` defaults to `weights_only=True`; fair-esm checkpoints pickle an `argparse.Namespace` | allow-list `argparse.Namespace` only (the safety stays on) |
| openfold 0.0.1 sdist | `resources/stereo_chemical_props.txt` is missing, so violation losses fail | the project's loss subset has no violation term (nothing to patch) |
| openfold 0.0.1 + torch >= 2.9 | `utils/tensor_utils.py:92` indexes with a list of slices, which torch warns about on every call (results are still right) | that one warning is filtered, by module and message |
| openfold 0.0.1 | `StructureModule` registers its residue-constant buffers lazily, at the first forward and in that call's dtype: DDP then syncs different buffer lists on different ranks (a gloo "collective mismatch" abort), and a first call under bf16 autocast would keep bf16 constants | `init_structure_module_buffers()` creates them eagerly in float32 |
| openfold 0.0.1 | `data/templates.py`, `data/data_pipeline.py` use `np.object` (gone in numpy 2) | never imported by this project (documented, nothing to patch) |
| openfold >= 2.0 | the IPA point projections became `PointProjection` modules, so their weights are named `ipa.linear_{q,kv}_points.linear.*` instead of `ipa.linear_{q,kv}_points.*` (same tensors, same layout); fair-esm's ESMFold checkpoints use the old names | `match_ipa_point_names()` renames whichever a state dict has to what the installed openfold's modules expect |
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util  # noqa: F401  (openfold.model.primitives relies on it being imported)
import re
import sys
import types
import warnings

import torch  # noqa: F401  (must precede openfold imports)

_APPLIED = False

# --- fair-esm: mutable dataclass defaults on Python >= 3.11 -----------------------------------

_FAIR_ESM_DATACLASS_MODULES = ("esm.esmfold.v1.trunk", "esm.esmfold.v1.esmfold")
# `name: Annotation = SomeConfig()` inside a dataclass body -> `field(default_factory=SomeConfig)`
_MUTABLE_DEFAULT = re.compile(r"^(\s+\w+\s*:\s*[\w.\[\]]+\s*=\s*)(\w+Config)\(\)\s*$", re.MULTILINE)


def _patch_fair_esm_source(source: str) -> str:
    patched, n = _MUTABLE_DEFAULT.subn(r"\1_esmfold_peft_field(default_factory=\2)", source)
    if n:
        patched = "from dataclasses import field as _esmfold_peft_field\n" + patched
    return patched


class _PatchedSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles a module from patched source (never from a stale unpatched .pyc)."""

    def get_code(self, fullname):
        source = self.get_data(self.path).decode("utf-8")
        return compile(_patch_fair_esm_source(source), self.path, "exec", dont_inherit=True)


class _FairEsmDataclassFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _FAIR_ESM_DATACLASS_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return spec
        spec.loader = _PatchedSourceLoader(fullname, spec.origin)
        return spec


# --- Biopython >= 1.82: Bio.Data.SCOPData removed ----------------------------------------------

def _alias_scopdata() -> None:
    try:
        import Bio.Data.SCOPData  # noqa: F401
        return
    except ImportError:
        pass
    from Bio.Data import PDBData

    mod = types.ModuleType("Bio.Data.SCOPData")
    mod.protein_letters_3to1 = PDBData.protein_letters_3to1_extended
    sys.modules["Bio.Data.SCOPData"] = mod
    import Bio.Data

    Bio.Data.SCOPData = mod


# --- torch.load weights_only with fair-esm checkpoints -----------------------------------------

def _allow_fair_esm_pickles() -> None:
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([argparse.Namespace])


def _quiet_openfold_indexing_warning() -> None:
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                            category=UserWarning, module=r"openfold\.utils\.tensor_utils")


def apply() -> None:
    """Apply every workaround once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _quiet_openfold_indexing_warning()
    if not any(isinstance(f, _FairEsmDataclassFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FairEsmDataclassFinder())
    _alias_scopdata()
    _allow_fair_esm_pickles()
    _APPLIED = True


def init_structure_module_buffers(structure_module) -> None:
    """Create openfold StructureModule's lazily-registered constant buffers now, in float32."""
    param = next(structure_module.parameters())
    structure_module._init_residue_constants(torch.float32, param.device)


# --- openfold >= 2.0: IPA point projections renamed ----------------------------------------------

_IPA_POINTS = re.compile(r"^(.*\.ipa\.linear_(?:q|kv)_points)\.(?:linear\.)?(weight|bias)$")


def match_ipa_point_names(state: dict, expected) -> dict:
    """`state` with its IPA point-projection keys named as in `expected` (the model's own keys).

    openfold 0.0.1 (and fair-esm's checkpoints) say `…ipa.linear_q_points.weight`, openfold >= 2.0
    `…ipa.linear_q_points.linear.weight`; whichever `state` has is mapped onto whichever the model
    expects. Other keys, and keys the model already knows, are left as they are.
    """
    expected = set(expected)
    out = {}
    for key, value in state.items():
        m = _IPA_POINTS.match(key)
        if m and key not in expected:
            for candidate in (f"{m.group(1)}.{m.group(2)}", f"{m.group(1)}.linear.{m.group(2)}"):
                if candidate in expected and candidate not in state:
                    key = candidate
                    break
        out[key] = value
    return out


def check_stack() -> None:
    """Import every dependency the application needs; raise with a clear message if one is missing."""
    apply()
    missing = []
    for name in ("openfold.utils.loss", "openfold.data.data_transforms",
                 "openfold.model.structure_module", "esm.esmfold.v1.trunk", "esm.pretrained",
                 "Bio.PDB", "ml_collections", "safetensors.torch"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # report all, not only the first
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    if missing:
        raise RuntimeError("the software stack is incomplete (run `make setup`):\n  " + "\n  ".join(missing))


apply()
