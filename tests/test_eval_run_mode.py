"""scripts/evaluate.py --run: a trained run evaluated on its split as training validates it."""

import json
from pathlib import Path

import pytest
import torch

from esmfold_peft.eval.metrics import rmsd_ca
from esmfold_peft.fold.run.checkpoint import load_trained_model
from esmfold_peft.fold.experiments.evaluate_run import evaluate_run, split_dataset
from esmfold_peft.runtime.errors import EXIT_OK
from esmfold_peft.fold.train import train
from esmfold_peft.fold.validate import validate
from fold_fixtures import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_run_config(tmp, adapter="lorta", steps=2)
    cfg.val.crop_size = 12  # the validation chains (16 and 24 residues) are cut to windows, one not at the start
    assert train(cfg, tmp / "run", progress=False) == EXIT_OK
    return tmp / "run"


def load_script():
    from fold_fixtures import load_script as load

    return load("evaluate")


def test_val_split_report_matches_validate(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert load_script().main(["--run", str(run_dir), "--split", "val", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "validation LDDT-Cα" in stdout and f"to {out}" in stdout

    report = json.loads((out / "report.json").read_text())
    model, cfg = load_trained_model(run_dir)
    dataset = split_dataset(cfg, "val", progress=False)
    expected = validate(model, dataset, torch.device("cpu"), num_recycles=cfg.val.num_recycles, keep_outputs=True)
    assert report["run"]["validation"]["lddt_ca"] == expected["lddt_ca"]
    assert report["overall"]["lddt_ca_global_pooled_mean_over_chains"] == pytest.approx(expected["lddt_ca"], rel=1e-12)
    assert report["overall"]["lddt_ca_pooled_over_all_pairs"] == pytest.approx(expected["lddt_ca_pooled_all"],
                                                                                rel=1e-12)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["run"]["validation"]["lddt_ca"] == pytest.approx(summary["val_lddt_ca_final"], rel=1e-6)
    assert "OpenFold validation" in report["run"]["validation"]["aggregation"]

    reported = {c["name"]: c for c in report["chains"]}
    assert sorted(reported) == sorted(c["name"] for c in expected["chains"])
    for index, (summary, outputs) in enumerate(zip(expected["chains"], expected["outputs"])):
        chain = reported[summary["name"]]
        assert chain["lddt_ca_global_pooled"] == summary["lddt_ca"]
        assert chain["length"] == summary["length"] == 12  # the validation window
        assert chain["pairing"] == "residue_number" and chain["n_scored"] == 12
        # the reference is the window validate scored: same Cα RMSD as from validate's own tensors
        ref_ca = dataset[index]["all_atom_positions"][:, 1].numpy()
        assert chain["rmsd_ca"] == pytest.approx(rmsd_ca(outputs["atom37_positions"][:, 1].numpy(), ref_ca), abs=1e-4)
        assert chain["mean_plddt"] == pytest.approx(float(outputs["plddt"].mean()), rel=1e-6)
    assert any(c["per_residue"]["residue"][0] != "1" for c in report["chains"])  # a window inside a chain
    assert report["failures"] == [] and report["run"]["split"] == "val"
    # the tiny run trained pLDDT on Cα and never its pTM head: pLDDT is reported, pTM is not
    assert report["run"]["confidence"]["plddt_head"] == "ca" and not report["run"]["confidence"]["ptm_head_trained"]
    assert all(c["ptm"] is None and c["mean_plddt"] is not None for c in report["chains"])
    assert report["overall"]["calibration"]["ptm"] is None and report["overall"]["calibration"]["per_residue"]["n"] > 0
    assert (out / "report.md").read_text().count("## Run") == 1
    assert {"per_residue_lddt_001.png", "plddt_vs_lddt.png"} <= {p.name for p in out.iterdir()}


def test_train_split_and_overrides(run_dir, tmp_path):
    run = evaluate_run(run_dir, tmp_path / "eval", split="train", num_recycles=1, max_chains=2,
                       checkpoint=run_dir / "checkpoints" / "last.pt", plots=False, progress=False)
    report = json.loads(run.files.json.read_text())
    assert run.ok and len(run.chains) == 2 and report["figures"] == []
    assert report["run"]["split"] == "train" and report["run"]["n_chains_in_split"] == 4
    assert report["run"]["num_recycles"] == 1 and report["run"]["checkpoint"].endswith("last.pt")
    assert report["overall"]["lddt_ca_global_pooled_mean_over_chains"] == pytest.approx(run.validation["lddt_ca"],
                                                                                         rel=1e-12)


def test_run_mode_errors(run_dir, tmp_path, capsys):
    script = load_script()
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["val_dir"] = ""
    (no_val / "config.json").write_text(json.dumps(config))
    (no_val / "model").symlink_to(run_dir / "model")
    (no_val / "adapter").symlink_to(run_dir / "adapter")
    assert script.main(["--run", str(no_val), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "the run has no validation chains" in capsys.readouterr().err
    assert script.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nothing'}") and "run directory" in err and len(err.splitlines()) == 1
    (tmp_path / "a_file").write_text("")
    assert script.main(["--run", str(run_dir), "--out", str(tmp_path / "a_file"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'a_file'}: exists and is not a directory\n"
    for argv in (["--run", str(run_dir), "--pred", "p.pdb", "--ref", "r.pdb"],
                 ["--run", str(run_dir), "--lddt-cutoff", "10"],
                 ["--run", str(run_dir), "--split", "test"]):
        with pytest.raises(SystemExit) as info:
            script.main(argv + ["--out", str(tmp_path / "o")])
        assert info.value.code == 2
