"""Structures from sequences, as fair-esm's esm-fold predicts them, with a trained run or ESMFold.

    run = predict_fasta("seqs.fasta", "runs/demo-lorta-r8", "predictions/")
    run = predict_fasta("seqs.fasta", None, "predictions/", esmfold="esmfold_3B_v1.pt", lm="esm2_t36_3B_UR50D.pt")

For each usable FASTA record (see `esmfold_peft.data.fasta` for what is accepted) it writes
`<stem>.pdb` (or `<stem>.cif`, mmCIF, with `structure_format="cif"`), `<stem>.json`, and `<stem>.pae.npz` with
`<stem>.pae.json` (only when the pTM head was trained) into the output directory, and for the whole file
`predictions.json` and `summary.tsv` (one row per FASTA record: id, length, chains, adapter, mean_plddt, ptm,
seconds, status). Each predicted record gets esm-fold's line on stderr (`record_line`, logged at INFO on
rank 0). Conventions:

* PDB: chains A, B, ... (one per chain of an `A:B` record; a monomer is chain A), each chain's
  residues numbered from 1, every heavy atom the residue type has (atom37 from the structure
  module's atom14 positions, as ESMFold writes them). X residues are written as UNK with a Cα
  only, at the origin of the predicted backbone frame (the model places no other atom for them;
  for the 20 standard residues that origin is exactly the predicted Cα);
* confidence follows where the model's heads come from (`confidence`; predictions.json's
  `confidence` object says which case applies and why):
  - B-factors: a lDDT head trained per atom (fair-esm's, `--esmfold`; or a run fine-tuned from a
    pretrained ESMFold, `model.init_from`, that left the head as it was) gives each atom's own pLDDT
    (0..100), as esm-fold writes it, so atoms of one residue differ. A head trained in the run with
    the pLDDT-Cα loss (Cα only, as AF2 and OpenFold train it) gives the residue's Cα pLDDT on all of
    its atoms (the AF2/ColabFold convention): its other 36 channels never trained. A head never
    trained gives 0.00. A REMARK line of the PDB says which;
  - `mean_plddt`: the mean over residues of the Cα pLDDT (`Prediction.mean_plddt`; esm-fold's own
    printout averages over all atoms instead, which differs for per-atom models);
    `plddt_per_residue`: each residue's Cα pLDDT (2 decimals); both null when the head never trained;
  - `ptm`, `ptm_per_chain` (each chain alone), `iptm` (AF-multimer's interface pTM; null for a
    monomer), `max_predicted_aligned_error` and `<stem>.pae.npz` only from a trained pTM head (the
    pretrained file's, or trained in the run with `loss.tm.weight` > 0); otherwise they are null, no
    PAE file is written (`"pae": null`), and the job says why once on stderr;
* multimers: the chains are joined by a 25-residue poly-G linker and each chain's residue index
  (with the linker after it) is raised by 512 per chain inside the model, exactly as esm-fold does
  (`encode_sequences`). Unlike esm-fold, the linker is removed from everything written (no linker
  residue in the PDB, its rows and columns cut from the PAE) and pTM is computed without it
  (openfold's `compute_tm` with the linker's residue weights set to 0); for a monomer that is the
  model's own pTM. `ptm_per_chain`: the same with only one chain's residues weighted; `iptm`: for
  each residue aligned on, the TM terms of the other chains' residues averaged, d0 from the whole
  complex's length, the largest over residues (`interface_ptm`);
* `<stem>.pae.npz`: `pae`, the predicted aligned error in Å (float16 [L, L], row i = residue
  aligned on, column j = residue scored, L = residues without linkers), `chain_index` (int8 [L]) and
  `max_predicted_aligned_error` (the largest value the head can predict, also in the JSON);
* `<stem>.pae.json`: the same PAE in AlphaFold DB's format, `[{"predicted_aligned_error": [[...]],
  "max_predicted_aligned_error": 31.75}]`, values rounded to 2 decimals;
* mmCIF (`structure_format="cif"`): the PDB text converted by Biopython (PDBParser, MMCIFIO): the same
  atoms, coordinates, chain ids and B-factors; the PDB's REMARK lines become comment lines;
* continuing a job (`skip_existing`): each record's JSON holds `inputs`, the sha256 of its sequence, the
  model's source (paths made absolute), the recycles and the format (`inputs_fingerprint`); a record whose
  JSON has the same id and fingerprint and whose files exist is kept, its summary reused. Without it, a
  rerun replaces the files;
* `<stem>` is the record id made filesystem-safe (`file_stems`);
* batches: records are sorted by length and packed while (sequences × longest length, linkers
  included) stays within the token budget (`max_tokens_per_batch`); shorter sequences are padded and
  masked, and results do not depend on the batching beyond float rounding. A batch that runs out
  of GPU memory is split in halves and retried, down to single sequences; a sequence that still
  does not fit is reported as failed;
* `chunk_size`: the trunk's triangular attention runs over chunks of this many rows (less memory,
  the same structure up to float rounding), as esm-fold's `--chunk-size`;
* several processes (`torchrun`, WORLD_SIZE > 1): the records are sorted by length and dealt out
  in turn (snake order, so each process gets a similar share of long ones); each process writes its
  records' files and a part summary (`.predictions.part-R-of-W.json`), and after a barrier rank 0
  merges them into the one `predictions.json` (the part files are then removed). The files of a
  record are the same as a single process writes;
* adapter: merged into the language model's weights for inference by default (the base model's
  cost), after checking on the first batch that merged outputs equal unmerged ones
  (`merge_adapter_checked`); a mismatch beyond the tolerance is an error.
"""

from ..run.confidence import CA_ONLY, PER_ATOM, ConfidenceHeads, confidence_heads, head_trained_in_run
from .files import TSV_COLUMNS, TSV_FILE, inputs_fingerprint, record_line, reusable_summary, summary_tsv
from .inputs import (CHAIN_LINKER, DEFAULT_MAX_TOKENS, RESIDUE_INDEX_OFFSET, SUMMARY_FILE, PredictionError,
                     encode_sequences, file_stems, length_batches, model_length, shard_records)
from .job import (PART_FILE, PredictionInterrupted, PredictionRun, PredictionWriter, is_out_of_memory, predict_fasta,
                  too_long_reason)
from .merge import DEFAULT_MERGE_TOLERANCE, MergeCheck, MergeMismatchError, merge_adapter_checked
from .outputs import (PAE_JSON_SUFFIX, PAE_SUFFIX, STRUCTURE_FORMATS, Prediction, chain_ptms, interface_ptm,
                      linker_masked_ptm, pdb_to_mmcif, predict_sequences)

__all__ = ["CA_ONLY", "CHAIN_LINKER", "DEFAULT_MAX_TOKENS", "DEFAULT_MERGE_TOLERANCE", "PAE_JSON_SUFFIX", "PAE_SUFFIX",
           "PART_FILE", "PER_ATOM", "RESIDUE_INDEX_OFFSET", "STRUCTURE_FORMATS", "SUMMARY_FILE", "TSV_COLUMNS",
           "TSV_FILE", "ConfidenceHeads", "MergeCheck", "MergeMismatchError", "Prediction", "PredictionError",
           "PredictionInterrupted", "PredictionRun", "PredictionWriter", "chain_ptms", "confidence_heads",
           "encode_sequences", "file_stems", "head_trained_in_run", "inputs_fingerprint", "interface_ptm",
           "is_out_of_memory", "length_batches", "linker_masked_ptm", "merge_adapter_checked", "model_length",
           "pdb_to_mmcif", "predict_fasta", "predict_sequences", "record_line", "reusable_summary", "shard_records",
           "summary_tsv", "too_long_reason"]
