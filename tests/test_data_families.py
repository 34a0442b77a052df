"""Synthetic sequence families: the substitution draw, the atoms kept, the files and their determinism."""

import json

import numpy as np
import pytest

from conftest import FRAGMENT_PDB
from esmfold_peft.data import families as fam
from esmfold_peft.data.structures import parse_structure
from esmfold_peft.runtime.errors import UserError
from openfold.np import residue_constants as rc

BACKBONE = [rc.atom_order[a] for a in ("N", "CA", "C", "O")]
CB = rc.atom_order["CB"]


@pytest.fixture
def parent(tmp_path):
    path = tmp_path / "frag.pdb"
    path.write_text(FRAGMENT_PDB)
    (chain,) = parse_structure(path)
    return chain


def test_draw_is_exact_deterministic_and_stable(parent):
    positions, new = fam.substitution_draw(parent, 0.5, seed=3, index=0)
    assert len(positions) == 4 and len(set(positions.tolist())) == 4  # round(0.5 x 8), without replacement
    assert (new != parent.aatype[positions]).all() and (new < 20).all()
    again = fam.substitution_draw(parent, 0.5, seed=3, index=0)
    assert all(np.array_equal(a, b) for a, b in zip((positions, new), again))
    other = [fam.substitution_draw(parent, 0.5, seed=3, index=k) for k in range(1, 6)]
    assert any(not np.array_equal(positions, p) or not np.array_equal(new, n) for p, n in other)
    first_two = fam.family_variants(parent, 2, 0.5, seed=3)
    five = fam.family_variants(parent, 5, 0.5, seed=3)
    assert [v.sequence for v in first_two] == [v.sequence for v in five[:2]]  # more variants: the first unchanged
    assert [v.name for v in five] == [f"{parent.name}_v{k:02d}" for k in range(5)]
    assert fam.family_variants(parent, 1, 0.5, seed=4)[0].sequence != five[0].sequence
    with pytest.raises(ValueError, match="rate"):
        fam.substitution_draw(parent, 1.5, seed=0, index=0)


def test_variant_keeps_the_backbone_and_drops_the_old_side_chains(parent):
    (variant,) = fam.family_variants(parent, 1, 0.5, seed=0)
    changed = np.flatnonzero(variant.aatype != parent.aatype)
    same = np.flatnonzero(variant.aatype == parent.aatype)
    assert len(changed) == 4 and fam.identity(variant, parent) == 0.5
    assert variant.sequence == "".join(rc.restypes_with_x[a] for a in variant.aatype)
    np.testing.assert_array_equal(variant.atom37_mask[same], parent.atom37_mask[same])
    np.testing.assert_array_equal(variant.atom37_positions[same], parent.atom37_positions[same])
    for i in changed:
        kept = np.flatnonzero(variant.atom37_mask[i])
        expected = BACKBONE + ([CB] if rc.restypes[variant.aatype[i]] != "G" else [])
        assert sorted(kept) == sorted(expected)
        np.testing.assert_array_equal(variant.atom37_positions[i, kept], parent.atom37_positions[i, kept])
        assert not variant.atom37_positions[i, variant.atom37_mask[i] == 0].any()
    assert variant.residue_index.tolist() == list(range(1, 9))  # numbered from 1
    assert parent.residue_index[0] == 156  # the parent is untouched


def test_glycine_has_no_cb_either_way(parent):
    gly = rc.restype_order["G"]
    to_gly = fam.substituted(parent, np.array([2]), np.array([gly]), "to_gly")
    assert to_gly.sequence[2] == "G" and to_gly.atom37_mask[2, CB] == 0 and to_gly.atom37_mask[2, BACKBONE].all()
    back = fam.substituted(to_gly, np.array([2]), np.array([rc.restype_order["A"]]), "from_gly")
    assert back.sequence[2] == "A" and back.atom37_mask[2, CB] == 0  # a CB the parent did not have is missing
    to_ser = fam.substituted(parent, np.array([2]), np.array([rc.restype_order["S"]]), "to_ser")
    assert to_ser.atom37_mask[2, CB] == 1 and to_ser.atom37_mask[2].sum() == 5


def test_written_families_read_back_as_written(parent, tmp_path):
    other = fam.substituted(parent, np.array([0]), np.array([rc.restype_order["W"]]), "other_A")
    out = tmp_path / "set"
    manifest = fam.write_families([parent, other], out, n_train=3, n_val=2, rate=0.25, seed=1)
    train, val = sorted((out / "train").glob("*.pdb")), sorted((out / "val").glob("*.pdb"))
    assert len(train) == 6 and len(val) == 4
    assert {p.stem for p in val} == {f"{n}_v{k:02d}" for n in (parent.name, "other_A") for k in (3, 4)}
    records = dict(line.split("\n")[:2] for line in (out / "val.fasta").read_text().split(">")[1:])
    for path in val:  # the FASTA is what the structure parser reads from each file
        (chain,) = parse_structure(path)
        assert records[path.stem] == chain.sequence
        v = next(v for v in manifest["variants"] if v["name"] == path.stem)
        assert v["split"] == "val" and len(v["substitutions"]) == 2 and v["identity_to_parent"] == 0.75
        assert chain.atom37_mask.sum() < parent.atom37_mask.sum()  # side chains of substituted residues gone
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert [p["name"] for p in manifest["parents"]] == [parent.name, "other_A"]

    stamp = {p: p.stat().st_mtime_ns for p in train}
    assert fam.write_families([parent, other], out, n_train=3, n_val=2, rate=0.25, seed=1) == manifest
    assert {p: p.stat().st_mtime_ns for p in train} == stamp  # the same set: nothing rewritten
    fam.write_families([parent], out, n_train=1, n_val=1, rate=0.25, seed=1)  # another set replaces it
    assert len(list((out / "train").glob("*.pdb"))) == 1 and len(list((out / "val").glob("*.pdb"))) == 1


def test_parents_are_the_shortest_usable_chains(parent):
    gap = fam.substituted(parent, np.array([], dtype=int), np.array([], dtype=int), "gap_A")
    gap.residue_index = gap.residue_index.copy()
    gap.residue_index[4:] += 10
    unknown = fam.substituted(parent, np.array([1]), np.array([20]), "unk_A")
    short = fam.substituted(parent, np.array([0]), np.array([0]), "short_A")
    short = fam.dataclasses.replace(short, **{k: getattr(short, k)[:6] for k in
                                             ("aatype", "atom37_positions", "atom37_mask", "b_factors",
                                              "residue_index")}, sequence=short.sequence[:6],
                                    insertion_codes=short.insertion_codes[:6])
    assert not fam.is_usable_parent(gap) and not fam.is_usable_parent(unknown)
    assert [c.name for c in fam.choose_parents([parent, gap, unknown, short], 2)] == ["short_A", parent.name]
    assert [c.name for c in fam.choose_parents([parent, short], 1, max_length=7)] == ["short_A"]
    with pytest.raises(UserError, match="only 1 usable parent chain.*at most 7 residues"):
        fam.choose_parents([parent, gap, short], 2, max_length=7)
