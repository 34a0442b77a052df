"""predict.py's esm-fold habits and more: -i/-o/--cpu-only/--no-progress, a line per record, summary.tsv, PAE in
AlphaFold DB's JSON, --format cif, --skip-existing, Ctrl-C with the command that continues, --max-length named."""

import json
import logging
import re
import shlex

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser

import esmfold_peft.fold.predict.job as job_module
from esmfold_peft.fold.predict import (CA_ONLY, PAE_JSON_SUFFIX, PAE_SUFFIX, TSV_COLUMNS, ConfidenceHeads,
                                       predict_fasta, record_line)
from fold_fixtures import load_script

A, B, DIMER = "MKTAYIAKQRQISFVK", "GSHMLEDPVKRWAC", "MKTAYIAK:DPWERSHLNV"


def script():
    return load_script("predict")


def fasta(tmp_path, records: dict, name="in.fasta"):
    path = tmp_path / name
    path.write_text("".join(f">{k}\n{v}\n" for k, v in records.items()))
    return path


def tsv_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    return [dict(zip(TSV_COLUMNS, line.split("\t"))) for line in lines[1:]]


def atoms(structure):
    return [(a.get_parent().get_parent().id, a.get_parent().id[1], a.get_id(), a.coord, a.get_bfactor())
            for a in structure.get_atoms()]


@pytest.fixture
def trained_ptm_head(monkeypatch):
    """The tiny run's heads said to be trained (pLDDT on Cα, pTM): its untrained pTM head still outputs numbers."""
    heads = ConfidenceHeads(CA_ONLY, True, "trained in the run (test)", "trained in the run (test)")
    monkeypatch.setattr(job_module, "model_heads", lambda model, cfg=None: heads)


# --- flags ------------------------------------------------------------------------------------------------

def test_short_flags_cpu_only_and_no_progress(tiny_lorta_run, tmp_path, capsys):
    path = fasta(tmp_path, {"a": A})
    assert script().main(["-i", str(path), "--run", str(tiny_lorta_run), "-o", str(tmp_path / "o"), "--cpu-only",
                          "--no-progress", "--no-merge"]) == 0
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["device"] == "cpu" and [p["id"] for p in summary["predictions"]] == ["a"]
    assert "wrote 1 structure(s)" in capsys.readouterr().out
    args = script().build_parser().parse_args(["-i", "f", "--run", "r", "-o", "o", "--quiet"])
    assert args.quiet and not args.no_progress and str(args.fasta) == "f" and str(args.out) == "o"


def test_cpu_only_and_another_device_are_refused_in_one_line(tmp_path, capsys):
    assert script().main(["-i", str(tmp_path / "f.fasta"), "--run", "R", "-o", str(tmp_path / "o"), "--cpu-only",
                          "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --cpu-only and --device cuda disagree: give one of them\n"


def test_help_names_the_new_flags_and_what_a_rerun_does(capsys):
    with pytest.raises(SystemExit):
        script().main(["--help"])
    text = re.sub(r"(?<=\w-) ", "", " ".join(capsys.readouterr().out.split()))  # argparse breaks lines at hyphens
    for flag in ("-i FILE, --fasta FILE", "-o DIR, --out DIR", "--cpu-only", "--no-progress", "--skip-existing",
                 "--format {pdb,cif}", "0 for no limit", "--cpu-offload", "--allow-other-base",
                 "logs an estimate of its peak memory"):
        assert flag in text, flag
    torchrun = [line for line in text.split("python scripts/predict.py") if "torchrun" in line]
    assert torchrun and all("--run-dir" in t for t in torchrun) and "Put '--' before" not in text
    assert "--quiet deprecated: --no-progress" in text
    assert "without --skip-existing a rerun replaces the files" in text
    assert "without --skip-existing a rerun into the same --out predicts every record again" in text


# --- the line per record, summary.tsv, --max-length named ---------------------------------------------------

def test_a_line_per_record_and_summary_tsv_in_fasta_order(tiny_lorta_run, tmp_path, caplog):
    path = tmp_path / "in.fasta"
    path.write_text(f">long\n{'A' * 30}\n>a\n{A}\n>gap\nMK--T\n>d two chains\n{DIMER}\n>b\n{B}\n")
    caplog.set_level(logging.INFO)
    assert script().main(["-i", str(path), "--run", str(tiny_lorta_run), "-o", str(tmp_path / "o"), "--no-merge",
                          "--max-length", "20", "--max-tokens-per-batch", "1", "--cpu-only"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Predicted structure")]
    # the tiny run trained pLDDT (Cα) but never its pTM head: no pTM in the line
    pattern = r"Predicted structure for (\S+) with length (\d+)( in 2 chains)?, pLDDT \d+\.\d in \d+\.\ds\. (\d) / 3 completed\."
    found = [re.fullmatch(pattern, line) for line in lines]
    assert all(found), lines
    assert sorted((m[1], m[2], m[4]) for m in found) == [("a", "16", "2"), ("b", "14", "1"), ("d", "18", "3")]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage().startswith("Predicted"))

    rows = tsv_rows(tmp_path / "o" / "summary.tsv")
    assert [r["id"] for r in rows] == ["long", "a", "gap", "d", "b"]  # every FASTA record, in file order
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    by_id = {p["id"]: p for p in summary["predictions"]}
    for row in rows:
        assert row["adapter"] == "lorta"
        if row["id"] in by_id:
            p = by_id[row["id"]]
            assert row["status"] == "predicted" and row["ptm"] == ""  # empty cell for null
            assert (int(row["length"]), int(row["chains"])) == (p["length"], p["n_chains"])
            assert float(row["mean_plddt"]) == pytest.approx(p["mean_plddt"], abs=0.006)
            assert float(row["seconds"]) == pytest.approx(p["seconds"], abs=0.006)
    assert rows[0]["status"] == ("failed: 30 residues, more than --max-length 20 (raise it, or --max-length 0 "
                                 "for no limit)")
    assert rows[2]["status"].startswith("failed: invalid character") and rows[2]["length"] == ""
    assert summary["max_length"] == 20 and summary["summary_tsv"] == "summary.tsv"


def test_max_length_zero_is_no_limit(tiny_lorta_run, tmp_path):
    run = predict_fasta(fasta(tmp_path, {"long": "A" * 30}), tiny_lorta_run, tmp_path / "o", max_length=0,
                        merge=False, progress=False)
    assert run.ok and [p["length"] for p in run.predicted] == [30]
    assert json.loads(run.summary_path.read_text())["max_length"] is None


def test_record_line_is_esm_folds():
    summary = {"id": "q1", "length": 76, "n_chains": 1, "mean_plddt": 71.234, "ptm": 0.6234, "iptm": None,
               "seconds": 0.81}
    assert record_line(summary, 3, 10) == ("Predicted structure for q1 with length 76, pLDDT 71.2, pTM 0.623 in 0.8s. "
                                           "3 / 10 completed.")
    summary.update(mean_plddt=None, ptm=None, n_chains=2)
    assert record_line(summary, 1, 2, rank=0, world=2) == ("Predicted structure for q1 with length 76 in 2 chains, "
                                                           "pLDDT n/a in 0.8s. 1 / 2 completed by process 0 of 2.")


# --- PAE in AlphaFold DB's format, mmCIF -----------------------------------------------------------------------

def test_pae_json_in_alphafold_dbs_format_matches_the_npz(tiny_lorta_run, tmp_path, trained_ptm_head):
    run = predict_fasta(fasta(tmp_path, {"a": A, "d": DIMER}), tiny_lorta_run, tmp_path / "o", merge=False,
                        progress=False)
    for record in run.predicted:
        assert record["pae_json"] == f"{record['id']}{PAE_JSON_SUFFIX}" and record["pae"].endswith(PAE_SUFFIX)
        data = json.loads((tmp_path / "o" / record["pae_json"]).read_text())
        assert isinstance(data, list) and len(data) == 1
        assert set(data[0]) == {"predicted_aligned_error", "max_predicted_aligned_error"}
        pae = np.array(data[0]["predicted_aligned_error"])
        npz = np.load(tmp_path / "o" / record["pae"])
        assert pae.shape == (record["length"], record["length"]) == npz["pae"].shape
        np.testing.assert_allclose(pae, npz["pae"].astype(np.float64), atol=0.02)  # float16 in the npz
        assert np.array_equal(pae, np.round(pae, 2))
        assert data[0]["max_predicted_aligned_error"] == round(record["max_predicted_aligned_error"], 2)


def test_untrained_ptm_head_writes_no_pae_json(tiny_lorta_run, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / f"a{PAE_JSON_SUFFIX}").write_text("[]")  # left by an earlier job
    run = predict_fasta(fasta(tmp_path, {"a": A}), tiny_lorta_run, out, merge=False, progress=False)
    assert run.predicted[0]["pae_json"] is None and not (out / f"a{PAE_JSON_SUFFIX}").exists()


def test_format_cif_has_the_pdbs_coordinates_b_factors_and_chains(tiny_lorta_run, tmp_path):
    path = fasta(tmp_path, {"a": A, "d": DIMER})
    pdb_run = predict_fasta(path, tiny_lorta_run, tmp_path / "pdb", merge=False, progress=False)
    cif_run = predict_fasta(path, tiny_lorta_run, tmp_path / "cif", merge=False, progress=False,
                            structure_format="cif")
    summary = json.loads(cif_run.summary_path.read_text())
    assert summary["format"] == "cif" and cif_run.structure_format == "cif"
    for p, c in zip(pdb_run.predicted, cif_run.predicted):
        assert p["structure"] == p["pdb"] == f"{p['id']}.pdb" and p["format"] == "pdb"
        assert c["structure"] == f"{c['id']}.cif" and c["pdb"] is None and c["format"] == "cif"
        assert not (tmp_path / "cif" / f"{c['id']}.pdb").exists()
        ours = atoms(PDBParser(QUIET=True).get_structure("p", tmp_path / "pdb" / p["pdb"]))
        theirs = atoms(MMCIFParser(QUIET=True).get_structure("c", tmp_path / "cif" / c["structure"]))
        assert [a[:3] for a in ours] == [a[:3] for a in theirs]  # chain ids, residue numbers, atom names
        np.testing.assert_array_equal(np.array([a[3] for a in ours]), np.array([a[3] for a in theirs]))
        assert [a[4] for a in ours] == [a[4] for a in theirs]
        assert {a[0] for a in theirs} == ({"A", "B"} if c["n_chains"] == 2 else {"A"})
        text = (tmp_path / "cif" / c["structure"]).read_text()
        assert text.startswith(f"data_{c['id']}\n# {c['id']}\n# B-factors: per-residue CA pLDDT")


def test_format_cif_reads_back_in_gemmi(tiny_lorta_run, tmp_path):
    gemmi = pytest.importorskip("gemmi")
    run = predict_fasta(fasta(tmp_path, {"d": DIMER}), tiny_lorta_run, tmp_path / "o", merge=False, progress=False,
                        structure_format="cif")
    path = tmp_path / "o" / run.predicted[0]["structure"]
    structure = gemmi.read_structure(str(path))
    assert [ch.name for ch in structure[0]] == ["A", "B"]
    theirs = [(a.pos.x, a.pos.y, a.pos.z, a.b_iso) for ch in structure[0] for r in ch for a in r]
    ours = [(*a[3], a[4]) for a in atoms(MMCIFParser(QUIET=True).get_structure("c", path))]
    np.testing.assert_allclose(np.array(theirs), np.array(ours), atol=1e-3)


# --- continuing a job: --skip-existing, Ctrl-C ----------------------------------------------------------------

def counting_predictions(monkeypatch, interrupt_on_call=None):
    """The sequences each forward pass predicts; with `interrupt_on_call`, Ctrl-C on that call (1-based)."""
    calls, real = [], job_module.predict_sequences

    def predict(model, sequences, device, num_recycles):
        calls.append(list(sequences))
        if len(calls) == interrupt_on_call:
            raise KeyboardInterrupt
        return real(model, sequences, device, num_recycles)

    monkeypatch.setattr(job_module, "predict_sequences", predict)
    return calls


def test_skip_existing_keeps_unchanged_records_and_predicts_changed_ones(tiny_lorta_run, tmp_path, monkeypatch,
                                                                         caplog):
    out = tmp_path / "o"
    common = ["--run", str(tiny_lorta_run), "-o", str(out), "--no-merge", "--no-progress", "--cpu-only"]
    assert script().main(["-i", str(fasta(tmp_path, {"a": A, "b": B})), *common]) == 0
    first = {p["id"]: p for p in json.loads((out / "predictions.json").read_text())["predictions"]}
    assert set(first["a"]["inputs"]) == {"sha256", "of"}
    mtime = (out / "a.pdb").stat().st_mtime_ns

    calls = counting_predictions(monkeypatch)
    changed = fasta(tmp_path, {"a": A, "b": B[:-2], "c": DIMER}, name="changed.fasta")  # b: a new sequence
    caplog.set_level(logging.INFO)
    assert script().main(["-i", str(changed), *common, "--skip-existing"]) == 0
    assert sorted(s for call in calls for s in call) == sorted([B[:-2], DIMER])  # a was not predicted again
    assert (out / "a.pdb").stat().st_mtime_ns == mtime
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["n_reused"] == 1 and summary["n_predicted"] == 3 and summary["skip_existing"] is True
    by_id = {p["id"]: p for p in summary["predictions"]}
    assert by_id["a"] == first["a"] and by_id["b"]["sequence"] == B[:-2]
    assert by_id["b"]["inputs"] != first["b"]["inputs"]
    assert [r["status"] for r in tsv_rows(out / "summary.tsv")] == ["predicted"] * 3
    assert any("kept 1 record(s)" in r.getMessage() for r in caplog.records)

    calls.clear()  # other settings (here the recycles) change every record's inputs: all predicted again
    assert script().main(["-i", str(changed), *common, "--skip-existing", "--num-recycles", "1"]) == 0
    assert len([s for call in calls for s in call]) == 3
    calls.clear()  # a missing file: predicted again
    (out / "c.pdb").unlink()
    assert script().main(["-i", str(changed), *common, "--skip-existing", "--num-recycles", "1"]) == 0
    assert calls == [[DIMER]]


def test_ctrl_c_writes_what_was_done_and_prints_the_command_that_continues(tiny_lorta_run, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "o"
    argv = ["-i", str(fasta(tmp_path, {"a": A, "b": B, "c": DIMER})), "--run", str(tiny_lorta_run), "-o", str(out),
            "--no-merge", "--max-tokens-per-batch", "1", "--no-progress"]
    counting_predictions(monkeypatch, interrupt_on_call=2)
    assert script().main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"interrupted: 1 of 3 record(s) predicted, their files and predictions.json (status "
                             f"interrupted) in {out}; continue with: python ")
    command = err[0].split("continue with: ", 1)[1]
    words = shlex.split(command)
    assert words[1].endswith("scripts/predict.py") and words[2:] == argv + ["--skip-existing"]
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["status"] == "interrupted" and summary["n_predicted"] == 1 and summary["n_not_reached"] == 2
    assert [r["status"] for r in tsv_rows(out / "summary.tsv")].count("not reached") == 2

    calls = counting_predictions(monkeypatch)
    assert script().main(words[2:]) == 0  # the printed command continues the job
    assert len([s for call in calls for s in call]) == 2
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["status"] == "completed" and summary["n_predicted"] == 3 and summary["n_reused"] == 1


def test_a_runs_adapter_on_another_language_model_is_refused_unless_allowed(tiny_lorta_run, tmp_path, capsys,
                                                                             caplog):
    """The run's LM adapter knows the weights it was trained on: a same-shape LM with other weights (given with
    --set model.lm.path) is refused in one line naming both, and --allow-other-base predicts with it anyway."""
    from fold_fixtures import write_tiny_hf_esm

    other = write_tiny_hf_esm(tmp_path / "other_esm", seed=7)
    capsys.readouterr()
    path = fasta(tmp_path, {"a": A})
    argv = ["-i", str(path), "--run", str(tiny_lorta_run), "--cpu-only", "--no-progress", "--no-merge",
            "--set", f"model.lm.path={other}"]
    assert script().main(argv + ["-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "--allow-other-base" in err, err
    assert not (tmp_path / "refused" / "a.pdb").exists()
    assert script().main(argv + ["-o", str(tmp_path / "allowed"), "--allow-other-base"]) == 0
    assert (tmp_path / "allowed" / "a.pdb").is_file()
    assert "loaded anyway" in caplog.text
