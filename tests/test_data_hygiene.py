"""Untrusted structure files: chain ids never leave the cache as paths; unusable chains are skipped by name."""

import json
import re

import numpy as np
import pytest

from esmfold_peft.data.cache import ChainCache, build_cache, chain_file_name, chain_file_path
from esmfold_peft.data.sources import Entry, Source, directory_source
from esmfold_peft.data.structures import StructureError, chain_fault, parse_structure
from esmfold_peft.runtime.errors import ArtifactError, UserError

SAFE_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.npz")


def mmcif_with_chain_id(to_mmcif, pdb_lines, chain_id):
    """The fragment as mmCIF with `chain_id` as the author chain id of every atom."""
    rows = []
    for row in to_mmcif(pdb_lines).splitlines():
        if row.startswith("ATOM"):
            fields = row.split(" ")
            fields[15] = chain_id  # auth_asym_id, which Biopython takes as the chain id
            row = " ".join(fields)
        rows.append(row)
    return "\n".join(rows) + "\n"


def with_chain(pdb_lines, chain_id):
    return [line[:21] + chain_id + line[22:] for line in pdb_lines]


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def crafted(tmp_path, pdb_lines, to_mmcif):
    """structures/ with an mmCIF whose chain id climbs out of the cache, and a PDB with chain '/'."""
    d = tmp_path / "work" / "structures"
    d.mkdir(parents=True)
    (d / "climb.cif").write_text(mmcif_with_chain_id(to_mmcif, pdb_lines, "../../../../../X"))
    (d / "slash.pdb").write_text("\n".join(with_chain(pdb_lines, "/")) + "\n")
    (d / "dot.pdb").write_text("\n".join(with_chain(pdb_lines, ".")) + "\n")
    return d


def test_crafted_chain_ids_stay_inside_the_cache(tmp_path, crafted):
    assert [c.chain_id for c in parse_structure(crafted / "climb.cif")] == ["../../../../../X"]
    outside_before = files_under(tmp_path)
    cache_dir = tmp_path / "work" / "cache"
    cache = build_cache(directory_source(crafted), cache_dir, progress=False)

    assert cache.bad == []
    # the records keep the real chain ids and names; only the file names are made safe
    assert {(r.chain_id, r.name) for r in cache.records} == {
        ("../../../../../X", "climb_../../../../../X"), ("/", "slash_/"), (".", "dot_.")}
    chain_files = list((cache_dir / "chains").iterdir())
    assert len(chain_files) == 3 and all(p.is_file() and SAFE_FILE.fullmatch(p.name) for p in chain_files)
    assert {r.file for r in cache.records} == {p.name for p in chain_files}
    # nothing was written anywhere but the cache
    new = set(files_under(tmp_path)) - set(outside_before)
    assert all(path.startswith("work/cache") for path in new), new
    for i, record in enumerate(cache.records):
        assert cache.load(i).chain_id == record.chain_id and len(cache.load(i)) == 8


def test_chain_file_names_are_safe_and_unique():
    names = [chain_file_name(n, "/data/x.cif", c) for n, c in
             [("x_A/B", "A/B"), ("x_A_B", "A_B"), ("..", ".."), (".hidden_A", "A"), ("x_" + "Q" * 500, "Q" * 500)]]
    assert len(set(names)) == len(names)
    assert all(SAFE_FILE.fullmatch(n) and len(n) < 128 for n in names)
    # the same chain name from another file gets another file name
    assert chain_file_name("x_A", "/data/x.cif", "A") != chain_file_name("x_A", "/other/x.cif", "A")


def test_a_chain_file_outside_the_chains_directory_is_refused(tmp_path, crafted):
    chains_dir = tmp_path / "chains"
    chains_dir.mkdir()
    for name in ("../x.npz", "sub/x.npz", "/etc/x.npz", ".."):
        with pytest.raises(ArtifactError, match="leads outside the cache's chains/ directory"):
            chain_file_path(chains_dir, name, culprit="src.pdb")
    assert chain_file_path(chains_dir, "ok.npz", culprit="src.pdb") == chains_dir / "ok.npz"

    # a manifest edited to point a chain elsewhere: loading it names the manifest
    cache_dir = tmp_path / "cache"
    build_cache(directory_source(crafted), cache_dir, progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["chains"][0]["file"] = "../../outside.npz"
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: chain file name '\.\./\.\./outside\.npz'"):
        ChainCache(cache_dir).load(0)


@pytest.fixture
def unusable_dir(tmp_path, pdb_lines):
    """good.pdb; nan.pdb with one non-finite coordinate; no_ca.pdb without any CA atom; two.pdb with one
    good chain (A) and one chain (B) whose coordinates are all infinite."""
    d = tmp_path / "structures"
    d.mkdir()
    (d / "good.pdb").write_text("\n".join(pdb_lines) + "\n")
    nan = list(pdb_lines)
    nan[9] = nan[9][:38] + "     nan" + nan[9][46:]  # residue 157, atom CA, y
    (d / "nan.pdb").write_text("\n".join(nan) + "\n")
    (d / "no_ca.pdb").write_text("\n".join(l for l in pdb_lines if l[12:16].strip() != "CA") + "\n")
    infinite = [l[:30] + "     inf     inf     inf" + l[54:] for l in with_chain(pdb_lines, "B")]
    (d / "two.pdb").write_text("\n".join(pdb_lines + infinite) + "\n")
    return d


def test_unusable_chains_are_skipped_with_their_reason(tmp_path, unusable_dir):
    cache = build_cache(directory_source(unusable_dir), tmp_path / "cache", progress=False)
    assert cache.names == ["good_A", "two_A"]
    reasons = {path.rsplit("/", 1)[1]: reason for path, reason in cache.bad}
    assert reasons == {
        "nan.pdb": "chain 'A' (nan_A): non-finite coordinates in 1 atom(s), the first at residue 157 atom CA",
        "no_ca.pdb": "chain 'A' (no_ca_A): no Cα atom in any residue",
        "two.pdb": "chain 'B' (two_B): non-finite coordinates in 59 atom(s), the first at residue 156 atom N",
    }
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {b["reason"] for b in manifest["bad"]} == set(reasons.values())
    assert len(list((tmp_path / "cache" / "chains").glob("*.npz"))) == 2
    for i in range(len(cache)):
        assert np.isfinite(cache.load(i).atom37_positions).all()


def test_a_chain_asked_for_by_id_is_skipped_when_unusable(tmp_path, unusable_dir):
    source = Source(kind="test", entries=[Entry("two_A", str(unusable_dir / "two.pdb"), "A"),
                                          Entry("two_B", str(unusable_dir / "two.pdb"), "B")])
    cache = build_cache(source, tmp_path / "cache", progress=False)
    assert cache.names == ["two_A"]
    assert cache.bad == [(str(unusable_dir / "two.pdb"), "chain 'B' (two_B): non-finite coordinates in 59 atom(s), "
                                                         "the first at residue 156 atom N")]


def test_chain_fault_names_each_unusable_kind(unusable_dir):
    good = parse_structure(unusable_dir / "good.pdb")[0]
    assert chain_fault(good) is None
    assert chain_fault(good.__class__(**{**vars(good), "sequence": "", "aatype": good.aatype[:0],
                                         "atom37_positions": good.atom37_positions[:0],
                                         "atom37_mask": good.atom37_mask[:0]})) == "no residues"
    assert "no Cα" in chain_fault(parse_structure(unusable_dir / "no_ca.pdb")[0])
    assert "non-finite" in chain_fault(parse_structure(unusable_dir / "nan.pdb")[0])


def test_structure_error_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        parse_structure(tmp_path / "absent.pdb")
    assert isinstance(info.value, StructureError) and info.value.exit_code == 2
    assert (info.value.path, info.value.reason) == (str(tmp_path / "absent.pdb"), "file not found")
