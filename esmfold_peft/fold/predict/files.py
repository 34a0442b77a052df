"""What one record leaves in the output directory (its structure, PAE and JSON files), how a later job knows it
can keep them (`--skip-existing`), its line on stderr, and the job's `summary.tsv`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ...atomic import atomic_write, write_json_atomic
from ...data.fasta import FastaContents, SequenceRecord
from ...runtime.text import finite_or_none
from ..run.confidence import ConfidenceHeads
from .outputs import PAE_JSON_SUFFIX, PAE_SUFFIX, STRUCTURE_FORMATS, Prediction, pdb_to_mmcif

TSV_FILE = "summary.tsv"
TSV_COLUMNS = ("id", "length", "chains", "adapter", "mean_plddt", "ptm", "seconds", "status")
FINGERPRINTED = ("sequence", "model", "num_recycles", "format")  # what `inputs_fingerprint` covers


def inputs_fingerprint(sequence: str, source: dict, num_recycles: int, fmt: str) -> dict:
    """A record JSON's `inputs`: the sha256 of the sequence and the settings that change its files (the model's
    source as given: run, checkpoint, --set overrides, ESMFold file and LM; recycles; the structure format)."""
    text = json.dumps({"sequence": sequence, "model": source, "num_recycles": int(num_recycles), "format": fmt},
                      sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "of": list(FINGERPRINTED)}


def record_summary(record: SequenceRecord, prediction: Prediction, stem: str, settings: dict,
                   heads: ConfidenceHeads, inputs: dict) -> dict:
    """A record's `<stem>.json`: numbers of a head that was never trained are null (`heads`), the PAE files too."""
    plddt, ptm, fmt = heads.plddt is not None, heads.ptm, settings["format"]
    return {"id": record.id, "description": record.description, "length": len(record),
            "n_chains": len(record.chains), "chain_lengths": [len(c) for c in record.chains],
            "mean_plddt": prediction.mean_plddt if plddt else None,
            "plddt_per_residue": [round(float(v), 2) for v in prediction.plddt] if plddt else None,
            "ptm": finite_or_none(prediction.ptm) if ptm else None,
            "ptm_per_chain": [finite_or_none(v) for v in prediction.ptm_per_chain] if ptm else None,
            "iptm": finite_or_none(prediction.iptm) if ptm else None,
            "max_predicted_aligned_error": finite_or_none(prediction.max_pae) if ptm else None,
            "seconds": prediction.seconds, "batch_size": prediction.batch_size,
            "num_recycles": settings["num_recycles"], "format": fmt, "structure": f"{stem}.{fmt}",
            "pdb": f"{stem}.pdb" if fmt == "pdb" else None,
            "pae": f"{stem}{PAE_SUFFIX}" if ptm else None, "pae_json": f"{stem}{PAE_JSON_SUFFIX}" if ptm else None,
            "substitutions": record.substitutions, "sequence": record.sequence, "inputs": inputs}


def write_record_files(out: Path, stem: str, record: SequenceRecord, prediction: Prediction,
                       heads: ConfidenceHeads, summary: dict) -> None:
    """The structure (PDB or mmCIF), the PAE files (a trained pTM head only) and the JSON, each atomically; files
    of the same stem that this job does not write (the other format, PAE of an untrained head) are removed."""
    adapter = f" adapter {summary['adapter']}" if "routing" in summary else ""  # an adapter library's choice
    pdb = prediction.to_pdb(heads.plddt, remark=record.id + adapter)
    fmt = summary["format"]
    text = pdb if fmt == "pdb" else pdb_to_mmcif(pdb, stem)
    atomic_write(out / summary["structure"], lambda tmp: Path(tmp).write_text(text))
    for other in STRUCTURE_FORMATS:
        if other != fmt:
            (out / f"{stem}.{other}").unlink(missing_ok=True)
    if heads.ptm:
        atomic_write(out / f"{stem}{PAE_SUFFIX}", lambda tmp: Path(tmp).write_bytes(prediction.pae_npz()))
        atomic_write(out / f"{stem}{PAE_JSON_SUFFIX}", lambda tmp: Path(tmp).write_text(prediction.pae_json()))
    else:  # no PAE from an untrained head; nor one left by an earlier job in the same directory
        (out / f"{stem}{PAE_SUFFIX}").unlink(missing_ok=True)
        (out / f"{stem}{PAE_JSON_SUFFIX}").unlink(missing_ok=True)
    write_json_atomic(out / f"{stem}.json", summary)


def reusable_summary(out: Path, stem: str, record: SequenceRecord, inputs: dict) -> Optional[dict]:
    """The summary in `<stem>.json` when it was written for this record id from the same inputs (`inputs_fingerprint`)
    and every file it names exists; else None (the record is predicted again)."""
    try:
        summary = json.loads((out / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("id") != record.id or summary.get("inputs") != inputs:
        return None
    names = [summary.get(key) for key in ("structure", "pae", "pae_json")]
    if not isinstance(names[0], str) or not all((out / n).is_file() for n in names if isinstance(n, str)):
        return None
    return summary


def record_line(summary: dict, done: int, total: int, rank: int = 0, world: int = 1) -> str:
    """esm-fold's line for a predicted record: `Predicted structure for q1 with length 76, pLDDT 71.2, pTM 0.623 in
    0.8s. 3 / 10 completed.` (pLDDT n/a from a head never trained; no pTM from an untrained pTM head)."""
    chains = f" in {summary['n_chains']} chains" if summary["n_chains"] > 1 else ""
    plddt = "n/a" if summary["mean_plddt"] is None else f"{summary['mean_plddt']:.1f}"
    scores = f"pLDDT {plddt}"
    if summary["ptm"] is not None:
        scores += f", pTM {summary['ptm']:.3f}"
    if summary["iptm"] is not None:
        scores += f", ipTM {summary['iptm']:.3f}"
    return (f"Predicted structure for {summary['id']} with length {summary['length']}{chains}, {scores} in "
            f"{summary['seconds']:.1f}s. {_completed(done, total, rank, world)}")


def failure_line(record: SequenceRecord, reason: str, done: int, total: int, rank: int = 0, world: int = 1) -> str:
    """The line for a record whose prediction failed (e.g. out of memory)."""
    return f"Failed to predict {record.id} with length {len(record)}: {reason}. {_completed(done, total, rank, world)}"


def _completed(done: int, total: int, rank: int, world: int) -> str:
    by = f" by process {rank} of {world}" if world > 1 else ""
    return f"{done} / {total} completed{by}."


def _cell(value, digits: int) -> str:
    value = finite_or_none(value)
    return "" if value is None else f"{value:.{digits}f}"


def summary_tsv(contents: FastaContents, summary: dict) -> str:
    """`summary.tsv`: one row per FASTA record in file order (TSV_COLUMNS), from predictions.json's `summary`;
    status `predicted`, `failed: <reason>` or `not reached` (an interrupted job); an empty cell for null."""
    predicted = {p["id"]: p for p in summary["predictions"]}
    failed = {(f["id"], f["line"]): f["reason"] for f in summary["failures"]}
    rows = sorted([(r.line, r.id, r) for r in contents.records] + [(b.line, b.id, None) for b in contents.bad],
                  key=lambda row: row[0])
    lines = ["\t".join(TSV_COLUMNS)]
    for line, record_id, record in rows:
        p = predicted.get(record_id) if record is not None else None
        if p is not None:
            cells = [p["length"], p["n_chains"], _cell(p["mean_plddt"], 2), _cell(p["ptm"], 4),
                     _cell(p["seconds"], 2), "predicted"]
        else:
            reason = failed.get((record_id, line))
            status = "not reached" if reason is None else "failed: " + " ".join(str(reason).split())
            cells = ([len(record), len(record.chains)] if record is not None else ["", ""]) + ["", "", "", status]
        adapter = p.get("adapter", summary["adapter"]) if p is not None else summary["adapter"]
        lines.append("\t".join(str(c) for c in [record_id, *cells[:2], adapter, *cells[2:]]))
    return "\n".join(lines) + "\n"
