"""Evaluation: LDDT-Cα (docs/method.md §4) and friends, residue pairing, reports and plots.

* `lddt`: LDDT-Cα, numpy (`lddt_ca`) and batched torch (`lddt_ca_torch`, for training validation);
* `metrics`: Kabsch superposition, Cα RMSD, GDT-TS and TM-score;
* `pairing`: which predicted chain / residue goes with which reference chain / residue;
* `chain_scores`: all metrics for one predicted chain against its reference (`score_chain`);
* `report`: `report.json`, `report.md` and PNG plots;
* `evaluate`: files or directories in, report out (`evaluate_paths`, used by scripts/evaluate.py).

This package imports `data/`, `runtime/` and `compat` only; evaluating a trained run on its data split
needs the model and lives in `esmfold_peft.fold.experiments.evaluate_run`.

Only `lddt` is imported here, so training code can use it without pulling in matplotlib or
Biopython; import the other modules directly.
"""

from esmfold_peft.eval.lddt import LDDT_CUTOFF, LDDT_THRESHOLDS, LddtBatch, LddtResult, lddt_ca, lddt_ca_torch

__all__ = ["LDDT_CUTOFF", "LDDT_THRESHOLDS", "LddtBatch", "LddtResult", "lddt_ca", "lddt_ca_torch"]
