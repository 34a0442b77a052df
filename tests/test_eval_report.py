"""report.json schema and aggregations, report.md, and the PNG plots."""

import json
from dataclasses import replace

import numpy as np
import pytest

from esmfold_peft.eval.chain_scores import score_chain
from esmfold_peft.eval.report import EvaluationFailure, plot_per_residue, summarize, write_report
from test_eval_pairing import SEQ, make_chain, random_walk

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CHAIN_KEYS = {"name", "pred_name", "ref_file", "pred_file", "length", "pred_length", "n_ref_with_ca", "n_scored",
              "pairing", "n_paired", "sequence_identity", "lddt_ca_global_pooled", "lddt_ca_mean_per_residue",
              "lddt_ca_n_pairs", "lddt_ca_score_sum", "rmsd_ca", "gdt_ts", "gdt_fractions", "tm_score",
              "mean_plddt", "per_residue", "coverage", "low_identity_or_coverage", "ptm", "baselines"}
OVERALL_KEYS = {"n_chains", "lddt_ca_global_pooled_mean_over_chains", "lddt_ca_mean_per_residue_mean_over_chains",
                "lddt_ca_pooled_over_all_pairs", "rmsd_ca_mean_over_chains", "gdt_ts_mean_over_chains",
                "tm_score_mean_over_chains", "mean_plddt_mean_over_chains", "n_chains_with_plddt",
                "n_chains_low_identity_or_coverage", "baselines", "margins", "calibration"}


@pytest.fixture(scope="module")
def scored_chains():
    rng = np.random.default_rng(0)
    chains = []
    for k, (n, noise, with_plddt) in enumerate([(30, 0.5, True), (45, 2.0, True), (20, 4.0, False)]):
        ca = random_walk(rng, n)
        pred = make_chain(SEQ[:n], ca=ca + rng.normal(scale=noise, size=ca.shape), name=f"t{k}_A",
                          b_factors=rng.uniform(40, 95, n) if with_plddt else None)
        chains.append(score_chain(pred, make_chain(SEQ[:n], ca=ca, name=f"t{k}_A", numbers=np.arange(20, 20 + n))))
    return chains


def test_report_files_and_json_schema(scored_chains, tmp_path):
    failures = [EvaluationFailure("pred/broken.pdb", "not parseable as PDB")]
    files = write_report(scored_chains, tmp_path, failures)
    report = json.loads(files.json.read_text())
    assert set(report) == {"conventions", "settings", "overall", "chains", "failures", "figures"}
    assert set(report["overall"]) == OVERALL_KEYS
    assert report["settings"]["lddt_cutoff"] == 15.0
    assert report["failures"] == [{"path": "pred/broken.pdb", "reason": "not parseable as PDB"}]
    assert len(report["chains"]) == 3
    for record, chain in zip(report["chains"], scored_chains):
        assert set(record) == CHAIN_KEYS
        assert record["lddt_ca_global_pooled"] == pytest.approx(chain.lddt.global_pooled)
        assert record["pairing"] == "alignment"  # prediction numbered from 1, reference from 20
        assert len(record["per_residue"]["lddt_ca"]) == record["length"]
        assert record["per_residue"]["residue"][0] == "20"
    assert report["chains"][2]["mean_plddt"] is None and report["chains"][2]["per_residue"]["plddt"] is None
    assert report["overall"]["n_chains_with_plddt"] == 2

    for path in files.figures:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert {p.name for p in files.figures} == {"per_residue_lddt_001.png", "plddt_vs_lddt.png",
                                               "plddt_reliability.png"}
    markdown = files.markdown.read_text()
    assert "| chain | length |" in markdown and "t1_A" in markdown and "pred/broken.pdb" in markdown
    assert "![plddt_vs_lddt](plddt_vs_lddt.png)" in markdown
    assert "## Beside sequence-only baselines (3 chain(s))" in markdown and "| ideal α-helix |" in markdown
    assert "no correlation given (n = 2, fewer than 10 chains)" in markdown  # never a bare r
    assert "| predicted (pLDDT/100) | residues |" in markdown


def test_overall_aggregations_are_the_named_ones(scored_chains):
    overall = summarize(scored_chains)
    pooled = sum(c.lddt.score_sum for c in scored_chains) / sum(c.lddt.n_pairs for c in scored_chains)
    assert overall["lddt_ca_pooled_over_all_pairs"] == pytest.approx(pooled)
    assert overall["lddt_ca_global_pooled_mean_over_chains"] == pytest.approx(
        np.mean([c.lddt.global_pooled for c in scored_chains]))
    assert overall["lddt_ca_mean_per_residue_mean_over_chains"] == pytest.approx(
        np.mean([c.lddt.mean_per_residue for c in scored_chains]))
    assert overall["mean_plddt_mean_over_chains"] == pytest.approx(
        np.mean([c.mean_plddt for c in scored_chains[:2]]))
    per_chain = overall["calibration"]["per_chain"]  # 2 chains: too few for a correlation, and it says so
    assert per_chain["n"] == 2 and per_chain["pearson_r"] is None and "fewer than" in per_chain["caveat"]
    assert overall["calibration"]["per_residue"]["n"] == 75  # the two chains with pLDDT, every residue scored
    base = overall["baselines"]
    assert base["n_chains"] == 3 and base["model"]["lddt_ca"] == overall["lddt_ca_global_pooled_mean_over_chains"]
    for name in ("helix", "compact"):
        assert base[name]["lddt_ca"] == pytest.approx(np.mean([c.baselines[name]["lddt_ca"] for c in scored_chains]))
    better = max(("helix", "compact"), key=lambda b: base[b]["lddt_ca"])
    assert overall["margins"]["lddt_ca"] == {"better_baseline": better, "baseline": base[better]["lddt_ca"],
                                             "margin": pytest.approx(base["model"]["lddt_ca"] - base[better]["lddt_ca"])}


def test_empty_evaluation_writes_a_valid_report(tmp_path):
    files = write_report([], tmp_path, [EvaluationFailure("a.pdb", "file not found")])
    report = json.loads(files.json.read_text())
    assert report["chains"] == [] and report["overall"]["lddt_ca_pooled_over_all_pairs"] is None
    assert files.figures == []


def test_per_residue_plots_are_paged(scored_chains, tmp_path):
    paths = plot_per_residue(scored_chains, tmp_path, chains_per_figure=2)
    assert [p.name for p in paths] == ["per_residue_lddt_001.png", "per_residue_lddt_002.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_low_identity_or_coverage_is_flagged_in_json_and_markdown(scored_chains, tmp_path):
    rng = np.random.default_rng(1)
    ref_seq = (SEQ * 2)[:117]
    ca = random_walk(rng, 117)
    ref = make_chain(ref_seq, ca=ca, name="ref_A")
    # a prediction of the first 65 residues only: identical where paired, coverage 65 / 117
    part = score_chain(make_chain(ref_seq[:65], ca=ca[:65], name="part_A"), replace(ref, name="part_A"))
    # a full-length prediction that differs at every 4th residue: identity 0.75
    mutated = "".join(("G" if a != "G" else "A") if i % 4 == 0 else a for i, a in enumerate(ref_seq))
    mutant = score_chain(make_chain(mutated, ca=ca, name="mutant_A"), replace(ref, name="mutant_A"))
    assert (len(part.pairing), part.sequence_identity) == (65, 1.0) and part.coverage == pytest.approx(65 / 117)
    assert mutant.coverage == 1.0 and mutant.sequence_identity == pytest.approx(0.75, abs=0.01)
    assert part.low_identity_or_coverage and mutant.low_identity_or_coverage
    assert not any(c.low_identity_or_coverage for c in scored_chains)  # same sequences, full coverage
    assert scored_chains[0].similarity_warning() is None
    assert part.similarity_warning().startswith("part_A: 65 of 117 reference residues paired")

    files = write_report([*scored_chains, part, mutant], tmp_path, plots=False)
    report = json.loads(files.json.read_text())
    assert [c["low_identity_or_coverage"] for c in report["chains"]] == [False, False, False, True, True]
    assert report["chains"][3]["coverage"] == pytest.approx(65 / 117)
    assert report["overall"]["n_chains_low_identity_or_coverage"] == 2
    markdown = files.markdown.read_text()
    assert "## ⚠ 2 chain(s) with low sequence identity or coverage" in markdown
    assert "| part_A ⚠ |" in markdown and "| mutant_A ⚠ |" in markdown and "| t0_A |" in markdown


def test_nan_b_factors_are_not_plddt(tmp_path):
    ca = random_walk(np.random.default_rng(2), 20)
    b = np.linspace(50, 90, 20)
    b[3] = np.nan
    scores = score_chain(make_chain(SEQ[:20], ca=ca, b_factors=b), make_chain(SEQ[:20], ca=ca))
    assert scores.plddt is None and scores.mean_plddt is None
    write_report([scores], tmp_path, plots=False)  # json refuses NaN: this would raise

