"""scripts/evaluate.py end to end on small PDB files written here."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"
THREE = {"A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE",
         "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER",
         "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR"}
SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"


def write_pdb(path, sequence, ca, first_number=1, chain_id="A", b_factors=None):
    """Cα-only ATOM records (PDB fixed columns)."""
    lines = []
    for i, (aa, (x, y, z)) in enumerate(zip(sequence, ca)):
        b = 0.0 if b_factors is None else b_factors[i]
        lines.append(f"ATOM  {i + 1:5d}  CA  {THREE[aa]} {chain_id}{first_number + i:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00{b:6.2f}           C")
    Path(path).write_text("\n".join(lines + ["END"]) + "\n")


def make_inputs(root):
    """pred/ and ref/ with two good pairs, one unparseable prediction, one reference without prediction."""
    rng = np.random.default_rng(0)
    pred_dir, ref_dir = root / "pred", root / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for k, stem in enumerate(["good1", "good2", "broken", "lonely"]):
        steps = rng.normal(size=(len(SEQ), 3))
        ca = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)
        # reference: residues 5..44 of the sequence, chain B, numbered from 20
        write_pdb(ref_dir / f"{stem}.pdb", SEQ[5:45], ca[5:45], first_number=20, chain_id="B")
        if stem == "broken":
            (pred_dir / f"{stem}.pdb").write_text("this is not a PDB file\n")
        elif stem != "lonely":
            write_pdb(pred_dir / f"{stem}.pdb", SEQ, ca + rng.normal(scale=0.5 * (k + 1), size=ca.shape),
                      b_factors=rng.uniform(50, 90, len(SEQ)))
    return pred_dir, ref_dir


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_directories_with_an_unparseable_file_exit_1_and_evaluate_the_others(tmp_path):
    pred_dir, ref_dir = make_inputs(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pred", str(pred_dir), "--ref", str(ref_dir),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert f"to {out}" in proc.stdout and "2 chain(s)" in proc.stdout
    assert str(pred_dir / "broken.pdb") in proc.stderr
    assert str(ref_dir / "lonely.pdb") in proc.stderr and "no prediction" in proc.stderr

    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["chains"]] == ["good1_B", "good2_B"]
    assert all(c["pairing"] == "alignment" and c["n_scored"] == 40 for c in report["chains"])
    assert all(c["mean_plddt"] is not None for c in report["chains"])
    failed = {Path(f["path"]).name for f in report["failures"]}
    assert failed == {"broken.pdb", "lonely.pdb"}
    assert (out / "report.md").exists() and (out / "plddt_vs_lddt.png").exists()


def test_single_file_against_single_file_exits_0(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    out = tmp_path / "single"
    status = load_script().main(["--pred", str(pred_dir / "good1.pdb"), "--ref", str(ref_dir / "good1.pdb"),
                                 "--out", str(out), "--quiet", "--no-plots"])
    assert status == 0
    assert "1 chain(s)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["chains"]) == 1 and report["failures"] == [] and report["figures"] == []


def test_missing_input_path_is_a_clear_error(tmp_path, capsys):
    status = load_script().main(["--pred", str(tmp_path / "nope.pdb"), "--ref", str(tmp_path / "nope2.pdb"),
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert status == 1
    assert f"prediction path not found: {tmp_path / 'nope.pdb'}" in capsys.readouterr().err
