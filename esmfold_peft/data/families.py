"""Synthetic sequence families: variants of a real chain that keep its backbone (for demonstrations).

No protein family ships with the offline demo data (TS50 holds 50 unrelated chains), so a family
is made from one real chain, its *parent*: K sequences with a fixed fraction of positions
substituted at random, all placed on the parent's experimental backbone. This is synthetic: real
homologues differ in structure too, and their substitutions are not uniform. It gives what a
fine-tuning demonstration needs: chains that share one fold, with sequences a model has to
generalise across (at a rate of 0.3, two variants share about half of their residues).

For a parent of L residues, variant k:

* exactly round(rate × L) positions (among the standard residues) are drawn without replacement,
  and each gets one of the 19 other standard amino acids, uniformly;
* at a substituted position the backbone atoms N, CA, C, O are kept, and CB where both the old
  and the new residue have one (neither is glycine); every other side-chain atom is dropped, so it
  is masked as missing (its coordinates would belong to the old residue);
* unchanged positions keep every atom; residues are numbered from 1 (gaps kept);
* the draw depends only on (seed, parent name, k): the same files on every machine, and adding
  variants leaves the earlier ones as they were.

`write_families` writes a family set: `train/` and `val/` directories of PDB files (the first
`n_train` variants of each parent, then `n_val` more), a FASTA file per split, and
`manifest.json` (parents, rate, seed and every variant's substitutions).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import esmfold_peft.compat  # noqa: F401  (must precede openfold imports)
from esmfold_peft.atomic import atomic_write, write_json_atomic
from esmfold_peft.data.structures import Chain
from esmfold_peft.runtime.errors import UserError
from openfold.np import protein as of_protein
from openfold.np import residue_constants as rc

KEPT_ATOMS = ("N", "CA", "C", "O")  # kept at a substituted position; CB too where both residues have one
MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "val")
_STANDARD = 20  # aatype 0..19 are the standard residues, 20 is X
_GLY = rc.restype_order["G"]


def substitution_draw(parent: Chain, rate: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, new aatype at them) of variant `index`: a pure function of (seed, parent.name, index)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"substitution rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng([int(seed), zlib.crc32(parent.name.encode()), int(index)])
    standard = np.flatnonzero(parent.aatype < _STANDARD)
    count = int(round(rate * len(parent)))
    if count > len(standard):
        raise ValueError(f"{parent.name}: {count} substitutions asked, only {len(standard)} standard residues")
    positions = np.sort(rng.choice(standard, size=count, replace=False))
    # one of the 19 other residues: an offset of 1..19 from the old one, modulo 20
    new = (parent.aatype[positions] + rng.integers(1, _STANDARD, size=count)) % _STANDARD
    return positions, new.astype(parent.aatype.dtype)


def substituted(parent: Chain, positions: np.ndarray, new_aatype: np.ndarray, name: str) -> Chain:
    """`parent` with residues `positions` changed to `new_aatype`, on the parent's backbone (module docstring)."""
    aatype = parent.aatype.copy()
    mask = parent.atom37_mask.copy()
    kept = np.zeros(mask.shape[1], dtype=bool)
    kept[[rc.atom_order[a] for a in KEPT_ATOMS]] = True
    cb = rc.atom_order["CB"]
    for pos, new in zip(positions, new_aatype):
        row = mask[pos] * kept
        if parent.aatype[pos] != _GLY and new != _GLY:
            row[cb] = parent.atom37_mask[pos, cb]
        mask[pos] = row
        aatype[pos] = new
    sequence = "".join(rc.restypes_with_x[a] for a in aatype)
    return dataclasses.replace(
        parent, name=name, sequence=sequence, aatype=aatype, atom37_mask=mask,
        atom37_positions=np.where(mask[..., None] > 0, parent.atom37_positions, 0.0).astype(np.float32),
        b_factors=np.where(mask > 0, parent.b_factors, 0.0).astype(np.float32),
        residue_index=parent.residue_index - parent.residue_index[0] + 1,
        insertion_codes=[""] * len(parent), source=f"variant of {parent.name} ({parent.source})")


def family_variants(parent: Chain, count: int, rate: float, seed: int, start: int = 0) -> list[Chain]:
    """Variants `start` .. `start + count - 1` of `parent`, named `<parent name>_vNN`."""
    variants = []
    for k in range(start, start + count):
        positions, new = substitution_draw(parent, rate, seed, k)
        variants.append(substituted(parent, positions, new, f"{parent.name}_v{k:02d}"))
    return variants


def is_usable_parent(chain: Chain) -> bool:
    """A chain a family can be built on: standard residues only, numbered without gaps or insertion
    codes, and N, CA and C in every residue."""
    backbone = [rc.atom_order[a] for a in ("N", "CA", "C")]
    return (len(chain) > 0 and bool((chain.aatype < _STANDARD).all())
            and bool((np.diff(chain.residue_index) == 1).all()) and not any(chain.insertion_codes)
            and bool((chain.atom37_mask[:, backbone] > 0).all()))


def choose_parents(chains: Iterable[Chain], count: int, max_length: int | None = None) -> list[Chain]:
    """The `count` shortest usable parents (ties by name), at most `max_length` residues each."""
    usable = sorted((c for c in chains if is_usable_parent(c) and (max_length is None or len(c) <= max_length)),
                    key=lambda c: (len(c), c.name))
    if len(usable) < count:
        limit = f" of at most {max_length} residues" if max_length else ""
        raise UserError(f"only {len(usable)} usable parent chain(s){limit} (complete backbone, no gap, no "
                        f"unknown residue), {count} needed")
    return usable[:count]


def chain_pdb(chain: Chain, remark: str | None = None) -> str:
    """A chain as PDB text (chain A, ATOM records of its present atoms), through openfold's writer."""
    prot = of_protein.Protein(atom_positions=chain.atom37_positions, aatype=chain.aatype,
                              atom_mask=chain.atom37_mask, residue_index=chain.residue_index,
                              b_factors=chain.b_factors, chain_index=np.zeros(len(chain), dtype=np.int64),
                              remark=remark)
    return of_protein.to_pdb(prot)


def fasta_text(chains: Sequence[Chain]) -> str:
    return "".join(f">{c.name}\n{c.sequence}\n" for c in chains)


def identity(a: Chain, b: Chain) -> float:
    """Fraction of identical residues of two chains of the same length (position by position)."""
    return float(np.mean(a.aatype == b.aatype))


def _settings(parents: Sequence[Chain], n_train: int, n_val: int, rate: float, seed: int) -> dict:
    return {"format": FORMAT, "parents": [{"name": p.name, "length": len(p), "sequence": p.sequence}
                                          for p in parents],
            "n_train": n_train, "n_val": n_val, "rate": rate, "seed": seed}


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of a family set, or None when there is none (or a damaged one)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_families(parents: Sequence[Chain], out_dir: str | Path, *, n_train: int, n_val: int, rate: float,
                   seed: int) -> dict:
    """Write the family set of `parents` into `out_dir` (module docstring) and return its manifest.

    Nothing is rewritten when `out_dir` already holds the same set (same parents, counts, rate and
    seed); a different set there is replaced. The manifest is written last, so a set cut short by
    a kill is written again on the next call.
    """
    out_dir = Path(out_dir)
    if n_train < 0 or n_val < 0 or n_train + n_val < 1:
        raise ValueError(f"need at least one variant per family (n_train={n_train}, n_val={n_val})")
    names = [p.name for p in parents]
    if len(set(names)) != len(names):
        raise ValueError(f"parent names repeat: {names}")
    settings = _settings(parents, n_train, n_val, rate, seed)
    manifest = read_manifest(out_dir)
    if manifest is not None and {k: manifest.get(k) for k in settings} == settings:
        return manifest
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / split).mkdir(parents=True)
    variants, written = [], {split: [] for split in SPLITS}
    for parent in parents:
        family = family_variants(parent, n_train + n_val, rate, seed)
        for k, variant in enumerate(family):
            split = "train" if k < n_train else "val"
            remark = f"synthetic variant {k} of {parent.name}: {rate:.0%} substituted, parent backbone"
            text = chain_pdb(variant, remark)
            atomic_write(out_dir / split / f"{variant.name}.pdb", lambda tmp, t=text: Path(tmp).write_text(t))
            written[split].append(variant)
            changed = np.flatnonzero(variant.aatype != parent.aatype)
            variants.append({"name": variant.name, "parent": parent.name, "split": split,
                             "identity_to_parent": round(identity(variant, parent), 4),
                             "substitutions": [f"{parent.sequence[i]}{i + 1}{variant.sequence[i]}" for i in changed]})
    for split in SPLITS:
        text = fasta_text(written[split])
        atomic_write(out_dir / f"{split}.fasta", lambda tmp, t=text: Path(tmp).write_text(t))
    manifest = {**settings, "synthetic": "variants of real chains on their parents' backbones "
                                         "(esmfold_peft.data.families)", "variants": variants}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest

