"""The demo data: split rule, fetch-only-what-is-missing, offline errors, and (when fetched) TS50 itself."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from esmfold_peft.data import demo
from esmfold_peft.data.cache import build_cache
from esmfold_peft.data.features import chain_to_features
from esmfold_peft.data.sources import demo_source
from esmfold_peft.data.structures import iter_structures
from esmfold_peft.runtime import registry
from esmfold_peft.runtime.errors import ArtifactError

NAMES = [f"{i}abc{c}.pdb.gz" for i in range(1, 6) for c in "ABCDEFGHIJ"]  # 50 synthetic names


def test_split_is_deterministic_and_order_free():
    split = demo.split_names(NAMES)
    assert len(split["train"]) == 40 and len(split["val"]) == 10
    assert set(split["train"]).isdisjoint(split["val"]) and set(split["train"]) | set(split["val"]) == set(NAMES)
    assert demo.split_names(list(reversed(NAMES))) == split
    assert demo.split_names(NAMES, salt="other") != split
    assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])


def test_default_root_is_in_the_project():
    paths = demo.demo_paths()
    from esmfold_peft.runtime.rundir import project_root

    assert paths.root == project_root() / "data" / "demo"
    assert (project_root() / "pyproject.toml").is_file()


def fake_demo(root):
    """A demo root that looks complete (50 structure names, ESM files), without content."""
    paths = demo.demo_paths(root)
    paths.structures_dir.mkdir(parents=True)
    for name in NAMES:
        (paths.structures_dir / name).write_bytes(b"")
    paths.esm_dir.mkdir()
    for name in demo.ESM_MEMBERS.values():
        (paths.esm_dir / name).write_bytes(b"x")
    return paths


def test_ensure_fetches_only_what_is_missing(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(demo, "pip_download", no_download)
    paths = fake_demo(tmp_path)
    assert demo.ensure_demo_data(tmp_path, log=lambda msg: None) == paths
    assert json.loads(paths.split_file.read_text())["val"] == demo.split_names(NAMES)["val"]
    assert demo.read_split(paths) == demo.split_names(NAMES)


def test_download_failure_says_what_to_fetch_by_hand(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(registry.FetchError) as info:
        demo.ensure_demo_data(tmp_path, log=lambda msg: None)
    message = str(info.value)
    assert "mdanalysistests==2.11.0" in message and "network unreachable" in message
    assert "https://pypi.org/project/mdanalysistests/2.11.0/" in message
    assert str(tmp_path / "structures") in message


def test_an_archive_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    """The registry served other bytes under the pinned version: nothing is read from them."""
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "mdanalysistests-2.11.0.tar.gz").write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    with pytest.raises(ArtifactError, match=f"is not the pinned {demo.TS50_SHA256} of mdanalysistests==2.11.0"):
        demo.ensure_demo_data(tmp_path, log=lambda msg: None)
    assert not (tmp_path / "structures").exists()


def test_ts50_parses_completely(demo_data):
    errors = []
    chains = list(iter_structures(demo_data.structure_files(), errors))
    assert errors == [] and len(chains) == 50
    assert all(len(c) >= 79 and len(c) <= 173 for c in chains)
    assert all("X" not in c.sequence for c in chains)
    for chain in chains:
        f = chain_to_features(chain)
        assert all(torch.isfinite(v).all() for v in f.values() if v.is_floating_point()), chain.name
        assert f["backbone_rigid_mask"].mean() > 0.97, chain.name


def test_demo_cache_splits(tmp_path, demo_data):
    train = build_cache(demo_source("train", demo_data.root), tmp_path / "train", progress=False)
    val = build_cache(demo_source("val", demo_data.root), tmp_path / "val", progress=False)
    assert (len(train), len(val)) == (40, 10) and train.bad == val.bad == []
    assert set(train.names).isdisjoint(val.names)
