"""Calibration statistics (eval.calibration) and sequence-only baselines (eval.baselines) on cases with a known answer."""

import math

import numpy as np
import pytest

from esmfold_peft.eval import baselines, calibration
from esmfold_peft.eval.lddt import lddt_ca


def test_perfectly_calibrated_confidence_has_zero_ece():
    rng = np.random.default_rng(0)
    predicted = rng.uniform(0, 1, 2000)
    diagram = calibration.reliability(predicted, predicted)  # observed equals predicted, residue by residue
    assert diagram.n == 2000 and diagram.ece == pytest.approx(0.0, abs=1e-12) and diagram.caveat is None
    assert sum(diagram.bin_counts) == 2000 and len(diagram.bin_counts) == 10
    for p, o in zip(diagram.mean_predicted, diagram.mean_observed):
        assert p == pytest.approx(o)


def test_overconfident_model_has_the_gap_as_ece():
    # says 0.85-0.95 everywhere, is right 0.5 of the way: ECE is the mean gap, 0.4
    predicted = np.linspace(0.85, 0.95, 500)
    diagram = calibration.reliability(predicted, np.full(500, 0.5))
    assert diagram.ece == pytest.approx(0.4, abs=1e-9)
    assert diagram.bin_counts[8] + diagram.bin_counts[9] == 500  # all in the top two bins
    assert "expected calibration error 0.400 over n = 500 residues" in diagram.text("pLDDT")
    # per bin: |mean predicted - mean observed| weighted by the bin's share
    gaps = [(c / 500) * abs(p - o) for c, p, o in zip(diagram.bin_counts, diagram.mean_predicted,
                                                      diagram.mean_observed) if c]
    assert sum(gaps) == pytest.approx(diagram.ece)


def test_too_few_residues_give_no_ece_but_say_why():
    diagram = calibration.reliability([0.2, 0.9, np.nan], [0.3, 0.1, 0.5])
    assert diagram.n == 2 and diagram.ece is None and "fewer than 100 residues" in diagram.caveat
    assert "no calibration error given (n = 2" in diagram.text("pLDDT")
    assert diagram.as_dict()["ece"] is None


def test_correlation_with_known_answer_and_fisher_interval():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.3, 0.9, 40)
    y = 0.5 * x + 0.1  # exactly linear and monotone: r = rho = 1
    exact = calibration.correlation(x, y)
    assert exact.pearson_r == pytest.approx(1.0) and exact.spearman_rho == pytest.approx(1.0) and exact.n == 40
    noisy = calibration.correlation(x, y + rng.normal(scale=0.05, size=40))
    r, (lo, hi) = noisy.pearson_r, noisy.pearson_ci95
    assert r > 0.8  # a strong positive correlation, not a perfect one
    half = 1.959963984540054 / math.sqrt(40 - 3)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)))
    assert lo < r < hi
    assert "n = 40 chains" in noisy.text("per chain") and "95% CI" in noisy.text("per chain")


def test_no_correlation_below_minimum_n_or_spread():
    few = calibration.correlation([0.1, 0.5, 0.9, 0.3], [0.2, 0.6, 0.8, 0.1])
    assert few.pearson_r is None and few.spearman_rho is None and "n = 4, fewer than 10 chains" in few.caveat
    # 12 chains whose mean pLDDT spans 16.6-16.7: no r however the LDDT-Cα varies
    flat = calibration.correlation(np.linspace(0.166, 0.167, 12), np.linspace(0.1, 0.6, 12))
    assert flat.pearson_r is None and "hardly vary" in flat.caveat and flat.n == 12
    assert flat.text("per chain").startswith("per chain: no correlation given (n = 12")


def test_ideal_helix_geometry():
    helix = baselines.ideal_helix(30)
    steps = np.linalg.norm(np.diff(helix, axis=0), axis=1)
    assert steps == pytest.approx(np.full(29, 3.83), abs=0.01)  # Cα-Cα of an α-helix
    assert np.diff(helix[:, 2]) == pytest.approx(np.full(29, 1.5))
    assert np.hypot(helix[:, 0], helix[:, 1]) == pytest.approx(np.full(30, 2.3))


@pytest.mark.parametrize("n", [20, 120])
def test_compact_chain_is_a_globule_with_real_steps(n):
    chain = baselines.compact_chain(n, 0)
    centred = chain - chain.mean(axis=0)
    assert math.sqrt((centred ** 2).sum(axis=1).mean()) == pytest.approx(2.2 * n ** 0.38)
    steps = np.linalg.norm(np.diff(chain, axis=0), axis=1)
    assert 3.0 < steps.min() and steps.max() < 4.6  # scaled by a factor near 1 from 3.8 Å steps
    d = np.linalg.norm(chain[:, None] - chain[None], axis=-1)
    assert d[np.triu_indices(n, 2)].min() > 2.5  # self-avoiding
    assert not np.allclose(chain, baselines.compact_chain(n, 1))  # seeds differ
    np.testing.assert_array_equal(chain, baselines.compact_chain(n, 0))  # and are fixed


def test_baselines_score_as_a_model_would():
    helix = baselines.ideal_helix(40)
    scores = baselines.baseline_scores(helix)  # a helical reference: the helix baseline is exact
    assert scores["helix"]["lddt_ca"] == pytest.approx(1.0) and scores["helix"]["tm_score"] == pytest.approx(1.0)
    assert scores["helix"]["gdt_ts"] == pytest.approx(1.0)
    assert scores["compact"]["lddt_ca"] < 0.6
    walks = [lddt_ca(baselines.compact_chain(40, s), helix).global_pooled for s in baselines.COMPACT_SEEDS]
    assert scores["compact"]["lddt_ca"] == pytest.approx(np.mean(walks))
    m = baselines.margin(0.7, scores)
    assert m["better_baseline"] == "helix" and m["margin"] == pytest.approx(0.7 - 1.0)
    assert "0.300 below the better sequence-only baseline (ideal α-helix 1.000)" in baselines.margin_text(0.7, scores)


def test_evaluate_reads_ptm_beside_the_predictions_and_reports_its_calibration(tmp_path):
    """12 predicted files with the predictions.json predict.py writes: pTM per chain against TM-score, with n."""
    import json

    from esmfold_peft.data.families import chain_pdb
    from esmfold_peft.eval.evaluate import evaluate_paths
    from test_eval_pairing import SEQ, make_chain, random_walk

    rng = np.random.default_rng(3)
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    records = []
    for k in range(12):
        ca = random_walk(rng, 30)
        noise = 0.3 + 0.4 * k  # worse and worse predictions
        pred = make_chain(SEQ[:30], ca=ca + rng.normal(scale=noise, size=ca.shape),
                          b_factors=np.full(30, 90.0 - 5 * k) + rng.uniform(0, 1, 30))
        (pred_dir / f"c{k:02d}.pdb").write_text(chain_pdb(pred))
        (ref_dir / f"c{k:02d}.pdb").write_text(chain_pdb(make_chain(SEQ[:30], ca=ca)))
        records.append({"id": f"c{k:02d}", "pdb": f"c{k:02d}.pdb", "n_chains": 1,
                        "ptm": None if k == 11 else 0.9 - 0.05 * k})  # the last: no pTM (an untrained head)
    (pred_dir / "predictions.json").write_text(json.dumps({"predictions": records}))
    run = evaluate_paths(pred_dir, ref_dir, tmp_path / "out", plots=False, progress=False)
    assert [c.ptm for c in run.chains] == pytest.approx([0.9 - 0.05 * k for k in range(11)] + [None])
    report = json.loads(run.files.json.read_text())
    ptm = report["overall"]["calibration"]["ptm"]
    assert ptm["n"] == 11 and ptm["pearson_r"] > 0.5  # pTM falls as the predictions get worse
    tm = [c.superposition.tm_score for c in run.chains[:11]]
    assert ptm["mean_absolute_error"] == pytest.approx(np.mean(np.abs(np.array([0.9 - 0.05 * k for k in range(11)])
                                                                      - tm)))
    per_chain = report["overall"]["calibration"]["per_chain"]
    assert per_chain["n"] == 12 and per_chain["pearson_r"] is not None and per_chain["caveat"] is None
    text = run.files.markdown.read_text()
    assert "## Calibration of pTM" in text and "over n = 11 chains" in text and "n = 12 chains" in text
