"""The per-chain cache: built once, rebuilt only for what changed, bad files listed."""

import json
import math
import os

import numpy as np
import pytest

from esmfold_peft.data import cache as cache_mod
from esmfold_peft.data.cache import ChainCache, build_cache, load_chain, save_chain, source_fingerprint
from esmfold_peft.data.sources import ChainFilter, directory_source, openfold_source
from esmfold_peft.data.structures import parse_structure


@pytest.fixture
def structure_dir(tmp_path, pdb_lines):
    d = tmp_path / "structures"
    d.mkdir()
    (d / "one.pdb").write_text("\n".join(pdb_lines) + "\n")
    (d / "two.pdb").write_text("\n".join(l[:21] + "B" + l[22:] for l in pdb_lines[:16]) + "\n")
    (d / "bad.pdb").write_text("")
    return d


@pytest.fixture
def parse_calls(monkeypatch):
    """The paths the cache parses, in order."""
    calls = []

    def counting_parse(path, chains=None):
        calls.append(os.path.basename(path))
        return parse_structure(path, chains)

    monkeypatch.setattr(cache_mod, "parse_structure", counting_parse)
    return calls


def test_build_lists_chains_and_bad_files(tmp_path, structure_dir, parse_calls):
    cache = build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    assert cache.names == ["one_A", "two_B"]
    assert [r.length for r in cache.records] == [8, 2] and cache.weights == [1.0, 1.0]
    assert cache.bad == [(str(structure_dir.resolve() / "bad.pdb"), "empty file")]
    assert sorted(parse_calls) == ["bad.pdb", "one.pdb", "two.pdb"]

    loaded, parsed = cache.load(0), parse_structure(structure_dir / "one.pdb")[0]
    assert loaded.sequence == parsed.sequence and loaded.name == "one_A"
    assert [cache.sequence(i) for i in range(len(cache))] == [cache.load(i).sequence for i in range(len(cache))]
    for field in ("aatype", "atom37_positions", "atom37_mask", "b_factors", "residue_index"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(parsed, field))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["bad"] == [{"path": str(structure_dir.resolve() / "bad.pdb"), "reason": "empty file"}]
    assert ChainCache(tmp_path / "cache").names == cache.names


def test_no_rebuild_when_nothing_changed(tmp_path, structure_dir, parse_calls):
    build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    parse_calls.clear()
    again = build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    assert parse_calls == [] and again.names == ["one_A", "two_B"]


def test_rebuild_only_the_changed_file(tmp_path, structure_dir, pdb_lines, parse_calls):
    first = build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    parse_calls.clear()
    (structure_dir / "two.pdb").write_text("\n".join(l[:21] + "B" + l[22:] for l in pdb_lines[:21]) + "\n")
    st = os.stat(structure_dir / "two.pdb")
    os.utime(structure_dir / "two.pdb", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    assert parse_calls == ["two.pdb"]
    assert second.fingerprint != first.fingerprint
    assert [r.length for r in second.records] == [8, 3] and second.load(1).sequence == "NIA"

    parse_calls.clear()
    (structure_dir / "one.pdb").unlink()
    third = build_cache(directory_source(structure_dir), tmp_path / "cache", progress=False)
    assert parse_calls == [] and third.names == ["two_B"]
    assert len(list((tmp_path / "cache" / "chains").glob("*.npz"))) == 1


def test_fingerprint_follows_settings_and_format_version(tmp_path, monkeypatch):
    (tmp_path / "mmcif").mkdir()
    cdc = tmp_path / "cdc.json"
    cdc.write_text(json.dumps({"1abc_A": {"seq": "ACDE", "resolution": 2.0}}))
    a = openfold_source(tmp_path / "mmcif", cdc)
    b = openfold_source(tmp_path / "mmcif", cdc, ChainFilter(max_resolution=4.0))
    stats = {e.path: {"size": None, "mtime_ns": None} for e in a.entries}
    assert a.entries == b.entries and source_fingerprint(a, stats) != source_fingerprint(b, stats)
    before = source_fingerprint(a, stats)
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", cache_mod.CACHE_FORMAT_VERSION + 1)
    assert source_fingerprint(a, stats) != before


def test_openfold_layout_end_to_end(tmp_path, pdb_lines, to_mmcif):
    mmcif_dir = tmp_path / "mmcif"
    mmcif_dir.mkdir()
    chain_b = [l[:21] + "B" + l[22:] for l in pdb_lines[:16]]
    (mmcif_dir / "1abc.cif").write_text(to_mmcif(pdb_lines + chain_b, "_refine.ls_d_res_high 1.5\n"))
    cdc = tmp_path / "chain_data_cache.json"
    cdc.write_text(json.dumps({
        "1abc_A": {"seq": "NIAEVCMD", "resolution": 1.5, "cluster_size": 2, "release_date": "2001-01-01"},
        "1abc_B": {"seq": "NI", "resolution": 1.5, "cluster_size": 1, "release_date": "2001-01-01"},
        "1abc_C": {"seq": "NIA", "resolution": 1.5, "cluster_size": 1, "release_date": "2001-01-01"},
        "9zzz_A": {"seq": "NIA", "resolution": 1.5, "cluster_size": 1, "release_date": "2001-01-01"},
    }))
    cache = build_cache(openfold_source(mmcif_dir, cdc), tmp_path / "cache", progress=False)
    assert cache.names == ["1abc_A", "1abc_B"]
    assert cache.weights == pytest.approx([0.25, 0.5])
    reasons = dict(cache.bad)
    assert reasons[str(mmcif_dir.resolve() / "9zzz.cif")] == "file not found"
    assert "no protein chain 'C'" in reasons[str(mmcif_dir.resolve() / "1abc.cif")]
    assert cache.load(0).resolution == 1.5


def test_parallel_build_matches_serial(tmp_path, structure_dir):
    serial = build_cache(directory_source(structure_dir), tmp_path / "serial", progress=False)
    parallel = build_cache(directory_source(structure_dir), tmp_path / "parallel", workers=2, progress=False)
    assert parallel.records == serial.records and parallel.bad == serial.bad


def test_chain_round_trip(tmp_path, structure_dir):
    chain = parse_structure(structure_dir / "one.pdb")[0]
    chain.insertion_codes[1] = "A"
    save_chain(chain, tmp_path / "c.npz")
    back = load_chain(tmp_path / "c.npz")
    assert back.insertion_codes == chain.insertion_codes and back.release_date is None
    assert math.isnan(back.resolution) and back.source == chain.source and back.chain_id == "A"
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:  # no pickled objects inside
        assert all(z[k].dtype != object for k in z.files)


def test_missing_cache_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_cache"):
        ChainCache(tmp_path)
