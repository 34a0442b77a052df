"""Sources: OpenFold layout filters and weights, plain directories, the demo split."""

import json

import pytest

from esmfold_peft.runtime.errors import ArtifactError

from esmfold_peft.data import demo
from esmfold_peft.data.sources import (ChainFilter, demo_source, directory_source,
                                       openfold_sampling_weight, openfold_source, passes_filter)

CHAIN_DATA_CACHE = {
    "1abc_A": {"release_date": "2005-01-01", "seq": "ACDEFGHIKL" * 30, "resolution": 2.0, "cluster_size": 4},
    "1abc_B": {"release_date": "2005-01-01", "seq": "ACDEFGHIKL" * 60, "resolution": 2.0, "cluster_size": 1},
    "2low_A": {"release_date": "2010-06-01", "seq": "ACDEFGHIKL" * 10, "resolution": 9.5, "cluster_size": 1},
    "3nmr_A": {"release_date": "2012-03-04", "seq": "ACDEFGHIKL" * 10, "resolution": None, "cluster_size": 2},
    "4pol_A": {"release_date": "2015-01-01", "seq": "Q" * 81 + "A" * 19, "resolution": 1.5, "cluster_size": 1},
    "5old_A": {"release_date": "1990-01-01", "seq": "Q" * 80 + "A" * 20, "resolution": 1.5},
}


def record(**kw):
    return {"seq": "ACDEFGHIKL", "resolution": 2.0, "release_date": "2005-01-01", **kw}


@pytest.mark.parametrize("rec, flt, expected", [
    (record(), ChainFilter(), True),
    (record(resolution=9.0), ChainFilter(), True),
    (record(resolution=9.01), ChainFilter(), False),
    (record(resolution=None), ChainFilter(), True),  # unknown passes, as in OpenFold
    (record(resolution=3.5), ChainFilter(max_resolution=3.0), False),
    (record(seq="Q" * 8 + "AA"), ChainFilter(), True),  # exactly 80% of one residue type
    (record(seq="Q" * 9 + "A"), ChainFilter(), False),
    (record(seq=""), ChainFilter(), False),
    (record(), ChainFilter(max_length=9), False),
    (record(), ChainFilter(max_length=10), True),
    (record(), ChainFilter(min_release_date="2005-01-01", max_release_date="2005-01-01"), True),
    (record(), ChainFilter(max_release_date="2004-12-31"), False),
    (record(), ChainFilter(min_release_date="2005-01-02"), False),
    (record(release_date=None), ChainFilter(min_release_date="2000-01-01"), False),
])
def test_passes_filter(rec, flt, expected):
    assert passes_filter(rec, flt) is expected


def test_sampling_weight():
    assert openfold_sampling_weight(100, 4) == pytest.approx(256 / 512 / 4)
    assert openfold_sampling_weight(300, None) == pytest.approx(300 / 512)
    assert openfold_sampling_weight(1000, 1) == 1.0
    assert openfold_sampling_weight(300, 0) == pytest.approx(300 / 512)


def test_openfold_source(tmp_path):
    mmcif_dir = tmp_path / "mmcif"
    mmcif_dir.mkdir()
    (mmcif_dir / "1abc.cif").write_text("data_1abc\n")
    (mmcif_dir / "3nmr.cif.gz").write_bytes(b"")
    cache = tmp_path / "chain_data_cache.json"
    cache.write_text(json.dumps(CHAIN_DATA_CACHE))

    source = openfold_source(mmcif_dir, cache)
    by_name = {e.name: e for e in source.entries}
    assert list(by_name) == ["1abc_A", "1abc_B", "3nmr_A", "5old_A"]  # 2low: 9.5 Å, 4pol: 81% Q
    assert by_name["1abc_A"].chain_id == "A" and by_name["1abc_A"].path == str(mmcif_dir.resolve() / "1abc.cif")
    assert by_name["3nmr_A"].path.endswith("3nmr.cif.gz")
    assert by_name["5old_A"].path.endswith("5old.cif")  # absent: reported when the cache is built
    assert by_name["1abc_A"].weight == pytest.approx(300 / 512 / 4)
    assert by_name["1abc_B"].weight == 1.0
    assert by_name["3nmr_A"].weight == pytest.approx(256 / 512 / 2)
    assert source.settings["filter"]["max_resolution"] == 9.0

    dated = openfold_source(mmcif_dir, cache, ChainFilter(min_release_date="2000-01-01", max_length=400))
    assert [e.name for e in dated.entries] == ["1abc_A", "3nmr_A"]


def test_directory_source(tmp_path):
    for name in ("b.pdb", "a.cif.gz", "c.ent", "README.md", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.pdb").write_text("")
    source = directory_source(tmp_path)
    assert [e.name for e in source.entries] == ["a", "b", "c"]
    assert all(e.chain_id is None and e.weight == 1.0 for e in source.entries)
    assert [e.name for e in directory_source(tmp_path, recursive=True).entries] == ["a", "b", "c", "d"]
    with pytest.raises(ArtifactError, match="no such structure directory"):
        directory_source(tmp_path / "absent")


def test_demo_source(tmp_path):
    paths = demo.demo_paths(tmp_path)
    paths.split_file.write_text(json.dumps({"train": ["1ahsA.pdb.gz", "3ieyB.pdb.gz"], "val": ["1h4aX.pdb.gz"]}))
    train = demo_source("train", tmp_path)
    assert [(e.name, e.chain_id) for e in train.entries] == [("1ahsA_A", "A"), ("3ieyB_B", "B")]
    assert train.entries[0].path == str((paths.structures_dir / "1ahsA.pdb.gz").resolve())
    assert [e.name for e in demo_source("val", tmp_path).entries] == ["1h4aX_X"]
    with pytest.raises(ValueError, match="unknown demo split"):
        demo_source("test", tmp_path)
    with pytest.raises(demo.DemoDataError, match="fetch_demo_data"):
        demo_source("train", tmp_path / "nowhere")
