"""The memory and time estimate logged before a long prediction batch (fold/predict/estimate.py): held to the
bench-memory figures (BENCHMARKS.md section 6) within the stated factor, logged by predict.py, and a warning
that names --chunk-size when the estimate exceeds the memory available."""

import json
import logging
from pathlib import Path

import pytest

import esmfold_peft.fold.predict.estimate as estimate
from esmfold_peft.fold.predict import predict_fasta
from esmfold_peft.fold.predict.estimate import STATED_FACTOR, FoldShape, transient_bytes, trunk_cost

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu-2core"
PAPER_D4_35M = dict(c_z=128, pair_heads=128 // 32, lm_layers=12, lm_heads=20, lm_dim=480)  # section 6's model


def measured_cells():
    cells = []
    for name in ("predict_memory.json", "predict_memory_full_depth.json"):
        data = json.loads((RESULTS / name).read_text())
        assert data["model"]["config"] == "paper_d4" and data["model"]["c_z"] == PAPER_D4_35M["c_z"]
        cells += [c for c in data["cells"] if c["status"] == "ok"]
    return cells


def test_the_estimate_is_within_the_stated_factor_of_every_bench_memory_cell():
    cells = measured_cells()
    assert len(cells) >= 10
    ratios = []
    for c in cells:
        shape = FoldShape(**PAPER_D4_35M, lm_sdpa=c["sdpa"])
        peak = c["resident_bytes"] + max(transient_bytes(shape, c["length"], 1, c["chunk_size"], 0).values())
        ratios.append(peak / c["peak_tensor_bytes"])
        for phase, measured in c.get("phase_peak_tensor_bytes", {}).items():
            ours = {"lm": "language model"}.get(phase, phase)
            est = c["resident_bytes"] + transient_bytes(shape, c["length"], 1, c["chunk_size"], 0)[ours]
            assert 1 / STATED_FACTOR <= est / measured <= STATED_FACTOR, (c["variant"], c["length"], phase)
    assert all(1 / STATED_FACTOR <= r <= STATED_FACTOR for r in ratios), ratios
    assert max(abs(r - 1) for r in ratios) < 0.1  # in fact within 10%, chunked or not, 256 to 1,024 residues


def test_the_time_model_follows_the_measured_block_seconds():
    data = json.loads((RESULTS / "predict_memory_full_depth.json").read_text())
    per_block = {c["length"]: sorted(c["block_seconds"])[len(c["block_seconds"]) // 2]
                 for c in data["cells"] if c["status"] == "ok" and c.get("block_seconds")}
    assert len(per_block) >= 3
    lengths = sorted(per_block)
    for short, long in zip(lengths, lengths[1:]):
        predicted = trunk_cost(long) / trunk_cost(short)
        assert 1 / STATED_FACTOR <= predicted / (per_block[long] / per_block[short]) <= STATED_FACTOR


def test_chunking_lowers_the_estimate_and_batches_scale_it():
    shape = FoldShape(**PAPER_D4_35M, lm_sdpa=True)
    unchunked = transient_bytes(shape, 1024)["trunk"]
    assert transient_bytes(shape, 1024, chunk_size=64)["trunk"] < unchunked / 4
    assert transient_bytes(shape, 300, batch=3)["trunk"] == pytest.approx(3 * transient_bytes(shape, 300)["trunk"],
                                                                          rel=1e-6)
    assert transient_bytes(shape, 300, recycles=3)["trunk"] > transient_bytes(shape, 300)["trunk"]


def fasta(tmp_path, records):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">{k}\n{v}\n" for k, v in records.items()))
    return path


def test_predict_logs_the_estimate_before_long_batches_with_the_jobs_rate(tiny_lorta_run, tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.setattr(estimate, "LONG_RECORD", 30)
    path = fasta(tmp_path, {"short": "MKTAYIAKQR", "long1": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV",
                            "long2": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV"})
    with caplog.at_level(logging.INFO, logger="esmfold_peft"):
        predict_fasta(path, tiny_lorta_run, tmp_path / "o", device="cpu", progress=False, merge=False,
                      max_tokens_per_batch=40)
    lines = [r.getMessage() for r in caplog.records if "estimated peak memory" in r.getMessage()]
    assert len(lines) == 2, lines  # the two long records, not the short one
    assert "a record of 32 residues" in lines[0] and "about" in lines[0] and "GiB available" in lines[0]
    assert "a record of 40 residues" in lines[1] and "at this job's rate" in lines[1]


def test_a_batch_that_would_not_fit_gets_a_warning_naming_chunk_size(tiny_lorta_run, tmp_path, monkeypatch, caplog):
    from esmfold_peft.fold.run.checkpoint import load_trained_model

    shape = FoldShape.of(load_trained_model(tiny_lorta_run)[0])
    room = (max(transient_bytes(shape, 40, 1, 8).values()) + max(transient_bytes(shape, 40, 1, 16).values())) // 2
    monkeypatch.setattr(estimate, "LONG_RECORD", 30)
    monkeypatch.setattr(estimate, "available_bytes", lambda device: room)  # fits chunked by 8, not by 16
    path = fasta(tmp_path, {"long": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV"})
    with caplog.at_level(logging.INFO, logger="esmfold_peft"):
        run = predict_fasta(path, tiny_lorta_run, tmp_path / "o", device="cpu", progress=False, merge=False,
                            num_recycles=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "available" in r.getMessage()]
    assert len(warnings) == 1 and "--chunk-size 8 should fit" in warnings[0], warnings
    assert not run.failures  # a warning only: the prediction is still tried
