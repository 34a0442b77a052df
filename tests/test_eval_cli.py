"""scripts/evaluate.py end to end on small PDB files written here."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import background

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
    from fold_fixtures import load_script as load

    return load("evaluate")


@background.job("evaluate_program")
def evaluate_program(folder):
    pred_dir, ref_dir = make_inputs(folder)
    out = folder / "out"
    return background.run(SCRIPT, "--pred", pred_dir, "--ref", ref_dir, "--out", out), pred_dir, ref_dir, out


def test_directories_with_an_unparseable_file_exit_1_and_evaluate_the_others():
    proc, pred_dir, ref_dir, out = background.result("evaluate_program")  # the script as a program
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
                                 "--out", str(out), "--no-progress", "--no-plots"])
    assert status == 0
    assert "1 chain(s)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["chains"]) == 1 and report["failures"] == [] and report["figures"] == []


def test_a_non_finite_coordinate_fails_its_pair_only(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    lines = (pred_dir / "good2.pdb").read_text().splitlines()
    lines[3] = lines[3][:30] + "     nan" + lines[3][38:]
    (pred_dir / "good2.pdb").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    status = load_script().main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out), "--no-progress",
                                 "--no-plots"])
    assert status == 1
    captured = capsys.readouterr()
    assert "1 chain(s)" in captured.out
    reason = "chain 'A' (good2_A): non-finite coordinates in 1 atom(s), the first at residue 4 atom CA"
    assert f"{pred_dir / 'good2.pdb'}: {reason}" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["chains"]] == ["good1_B"]
    assert {"path": str(pred_dir / "good2.pdb"), "reason": reason} in report["failures"]
    assert f"- `{pred_dir / 'good2.pdb'}`: {reason}" in (out / "report.md").read_text()


def test_low_identity_pair_is_scored_and_flagged(tmp_path, capsys):
    rng = np.random.default_rng(3)
    ca = np.cumsum(rng.normal(size=(len(SEQ), 3)) * 2.2, axis=0)
    mutated = "".join(("G" if a != "G" else "A") if i % 3 == 0 else a for i, a in enumerate(SEQ))
    write_pdb(tmp_path / "ref.pdb", SEQ, ca)
    write_pdb(tmp_path / "pred.pdb", mutated, ca)
    out = tmp_path / "out"
    status = load_script().main(["--pred", str(tmp_path / "pred.pdb"), "--ref", str(tmp_path / "ref.pdb"),
                                 "--out", str(out), "--no-progress", "--no-plots"])
    assert status == 0  # a flag, not a failure
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "ref_A: 53 of 53 reference residues paired" in warnings[0]
    assert "sequence identity 0.66" in warnings[0]  # 35 of 53
    report = json.loads((out / "report.json").read_text())
    assert report["chains"][0]["low_identity_or_coverage"] is True
    assert "| ref_A ⚠ |" in (out / "report.md").read_text()


def test_help_documents_thresholds_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "identity (identical / paired residues) is below 0.9" in text and "coverage (paired / reference" in text
    assert "Exit status: 0 if every file and chain was evaluated; 1 if some failed" in text
    assert "; 2 for a malformed command line or an input or output that cannot be used" in text


def _run_expecting_usage_error(tmp_path, capsys, pred, ref, out=None):
    status = load_script().main(["--pred", str(pred), "--ref", str(ref), "--out", str(out or tmp_path / "out"),
                                 "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_unusable_inputs_exit_2_with_one_line(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (tmp_path / "nope.pdb", ref_dir / "good1.pdb", f"{tmp_path / 'nope.pdb'}: prediction file or directory not found"),
        (pred_dir / "good1.pdb", tmp_path / "nope", f"{tmp_path / 'nope'}: reference file or directory not found"),
        (empty, ref_dir, f"{empty}: no structure files"),
        (pred_dir, ref_dir / "good1.pdb", "give two files or two directories"),
        (tmp_path / "notes.txt", ref_dir / "good1.pdb", f"{tmp_path / 'notes.txt'}: prediction file is not a structure"),
    ]
    for pred, ref, message in cases:
        assert message in _run_expecting_usage_error(tmp_path, capsys, pred, ref)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unusable_out_exits_2_with_one_line(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    (tmp_path / "a_file").write_text("")
    for out, message in [(tmp_path / "a_file", f"{tmp_path / 'a_file'}: exists and is not a directory"),
                         (tmp_path / "a_file" / "sub", f"cannot create output directory {tmp_path / 'a_file' / 'sub'}: "
                                                       "not a directory"),
                         (tmp_path / ("x" * 300), "file name too long")]:
        assert message in _run_expecting_usage_error(tmp_path, capsys, pred_dir, ref_dir, out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_of_out_exits_2(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = _run_expecting_usage_error(tmp_path, capsys, pred_dir, ref_dir, locked / "out")
    assert "permission denied" in err


def test_directories_without_one_matching_stem_exit_2_and_write_nothing(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    for path in pred_dir.iterdir():  # every prediction renamed: no stem in common with the references
        path.rename(path.with_name("other_" + path.name))
    out = tmp_path / "out"
    err = _run_expecting_usage_error(tmp_path, capsys, pred_dir, ref_dir, out)
    assert f"no prediction in {pred_dir} shares a file stem with a reference in {ref_dir}" in err
    assert "stems other_broken, other_good1, other_good2 against stems broken, good1, good2 and 1 more" in err
    assert not out.exists()


def test_quiet_is_the_old_name_of_no_progress(tmp_path, capsys):
    pred_dir, ref_dir = make_inputs(tmp_path)
    script = load_script()
    for flag in ("--no-progress", "--quiet"):
        assert script.build_parser().parse_args(["--pred", "p", "--ref", "r", "--out", "o", flag]).no_progress
        out = tmp_path / flag.strip("-")
        assert script.main(["--pred", str(pred_dir / "good1.pdb"), "--ref", str(ref_dir / "good1.pdb"),
                            "--out", str(out), flag, "--no-plots"]) == 0
        captured = capsys.readouterr()
        assert "1 chain(s)" in captured.out and "reading" not in captured.err and "scoring" not in captured.err
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--quiet deprecated: the old name of --no-progress" in help_text
