"""Which confidence heads of the model predicting were trained, and so what its pLDDT, pTM and PAE mean.

The lDDT head predicts, per residue and for each of the 37 atom slots, a distribution over 50 bins
of lDDT; pLDDT = 100 · Σ p_i · centre_i (AF2 Suppl. 1.9.6). fair-esm's ESMFold was trained on every
atom slot, and esm-fold writes each atom's own pLDDT as its B-factor. This project's pLDDT loss, as
AF2's and OpenFold's, trains the Cα slot only (`model.losses`): a head trained here has untrained
values in the other 36 slots, so its B-factors are the residue's Cα pLDDT on every atom (the
AF2/ColabFold convention). pTM and PAE come from the pTM head (AF2 Suppl. 1.9.7), which trains only
with `loss.tm.weight` > 0. A head that was never trained gives no number: its pLDDT is written as
B-factors 0.00 and null in the JSON, its pTM and PAE not at all.

Where a head comes from (`confidence_heads`):

* `--esmfold` (a fair-esm ESMFold file): both heads as the file's record says (`RECORD_KEY`, written by
  `scripts/export_esmfold.py`: the exported run's heads), and without a record (Meta's files) as trained
  by Meta: the lDDT head per atom, the pTM head trained;
* a run that trained the head (its loss weight > 0 and the head in `model.trainable`,
  `head_trained_in_run`): pLDDT on Cα only; pTM trained;
* a run started from a pretrained ESMFold (`model.init_from`) that did not train the head: the
  pretrained file's head, unchanged, as that file's record says (or Meta's, without one);
* otherwise (a run from scratch that did not train the head): never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...runtime.errors import ArtifactError
from .config import trained_parts

PER_ATOM = "per_atom"  # the lDDT head was trained on all 37 atom slots (fair-esm's ESMFold)
CA_ONLY = "ca"  # trained on the Cα slot only (this project's pLDDT-Cα loss)
RECORD_KEY = "esmfold_peft_confidence"  # a fair-esm ESMFold file's entry saying how its heads were trained
_LOSS_OF_HEAD = {"lddt_head": "plddt", "ptm_head": "tm"}  # the loss term (cfg.loss.<term>.weight) of each head

# predictions.json's confidence.b_factors, by plddt head
B_FACTORS = {
    PER_ATOM: "each atom's own pLDDT (0..100) from the lDDT head's 37 atom channels, as esm-fold writes it",
    CA_ONLY: "the residue's Cα pLDDT (0..100) on every atom of the residue (the AF2/ColabFold convention: the "
             "lDDT head was trained on Cα only, its other atom channels are untrained)",
    None: "0.00 on every atom: the pLDDT head was never trained, so no pLDDT is written",
}
# the PDB's REMARK lines on the B-factors (ASCII, short enough for 80-column records)
PDB_REMARKS = {
    PER_ATOM: ("B-factors: per-atom pLDDT (0-100), each atom's own channel of the",
               "lDDT head, as esm-fold writes them"),
    CA_ONLY: ("B-factors: per-residue CA pLDDT (0-100) on every atom of the residue",
              "(the model's pLDDT head was trained on CA only)"),
    None: ("B-factors: 0.00, no pLDDT (the model's pLDDT head was never trained)",),
}
MEAN_PLDDT = ("mean over residues of the Cα pLDDT (esm-fold's own printout averages over all atoms present; the "
              "two differ for per-atom models); null when the pLDDT head was never trained")


@dataclass(frozen=True)
class ConfidenceHeads:
    """What the model's confidence heads are, for what the outputs say.

    Attributes:
        plddt: PER_ATOM ("per_atom"), CA_ONLY ("ca") or None (the lDDT head was never trained).
        ptm: the pTM head was trained (else pTM, ipTM and PAE are not written).
        reason_plddt: where the lDDT head comes from, in words.
        reason_ptm: where the pTM head comes from, in words.
    """

    plddt: Optional[str]
    ptm: bool
    reason_plddt: str
    reason_ptm: str

    def __post_init__(self):
        if self.plddt not in B_FACTORS:
            raise ValueError(f"plddt must be one of {PER_ATOM!r}, {CA_ONLY!r} or None, got {self.plddt!r}")

    @property
    def b_factors(self) -> str:
        """What the PDB's B-factor column holds."""
        return B_FACTORS[self.plddt]

    def warnings(self) -> list[str]:
        """What a job says once, on stderr, about numbers it does not write."""
        out = []
        if self.plddt is None:
            out.append(f"pLDDT is not written (B-factors 0.00, mean_plddt null): {self.reason_plddt}")
        if not self.ptm:
            out.append(f"pTM and PAE are not written: {self.reason_ptm}")
        return out

    def as_dict(self) -> dict:
        """predictions.json's `confidence` object."""
        return {"plddt_head": self.plddt, "ptm_head_trained": self.ptm, "b_factors": self.b_factors,
                "mean_plddt": MEAN_PLDDT, "plddt_per_residue": "Cα pLDDT of each residue (0..100, 2 decimals); null "
                "when the pLDDT head was never trained",
                "ptm": "pTM, ipTM, ptm_per_chain and the PAE file: null / not written when the pTM head was never "
                       "trained", "reason_plddt": self.reason_plddt, "reason_ptm": self.reason_ptm}


def head_trained_in_run(cfg, head: str) -> bool:
    """Whether a run's training updated `head` ("lddt_head" or "ptm_head"): its loss weight > 0 and the head
    trainable (`model.trainable` names "heads" or "confidence"). The one place that reads this from a config."""
    weight = float(cfg.loss[_LOSS_OF_HEAD[head]].weight)
    return weight > 0 and "confidence" in trained_parts(cfg.model.trainable)


def _why_not(cfg, head: str) -> str:
    term = _LOSS_OF_HEAD[head]
    if not float(cfg.loss[term].weight) > 0:
        return f"loss.{term}.weight 0"
    return "model.trainable did not include the heads, and the run did not start from a pretrained ESMFold"


def file_record(heads: ConfidenceHeads) -> dict:
    """What an exported ESMFold file records of its heads (under `RECORD_KEY`)."""
    return {"plddt_head": heads.plddt, "ptm_head_trained": heads.ptm}


def read_file_record(data: dict, path) -> Optional[dict]:
    """The record of a fair-esm ESMFold file's unpickled dict, checked; None when it has none (Meta's files)."""
    record = data.get(RECORD_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("plddt_head") not in B_FACTORS or \
            not isinstance(record.get("ptm_head_trained"), bool):
        raise ArtifactError(path, f"damaged {RECORD_KEY!r} entry (needs plddt_head per_atom, ca or None, and "
                                  "ptm_head_trained true or false)")
    return {"plddt_head": record["plddt_head"], "ptm_head_trained": record["ptm_head_trained"]}


def _file_heads(record: Optional[dict], what: str) -> tuple[tuple, tuple]:
    """((plddt, reason), (ptm, reason)) of the heads an ESMFold file holds."""
    if record is None:
        return ((PER_ATOM, f"{what} lDDT head (per atom, as Meta's ESMFold files)"), (True, f"{what} pTM head"))
    plddt, ptm = record["plddt_head"], record["ptm_head_trained"]
    return ((plddt, f"{what} lDDT head ({'never trained' if plddt is None else plddt.replace('_', ' ')}, as the "
                    "file records)"),
            (ptm, f"{what} pTM head ({'trained' if ptm else 'never trained'}, as the file records)"))


def confidence_heads(cfg=None, *, esmfold: bool = False, record: Optional[dict] = None) -> ConfidenceHeads:
    """The confidence heads of a run (its config `cfg`) or of a fair-esm ESMFold file (`esmfold`); `record`: the
    ESMFold file's record (`read_file_record`: the --esmfold file's, or the run's model.init_from's); module
    docstring."""
    if esmfold:
        (plddt, why_plddt), (ptm, why_ptm) = _file_heads(record, "the ESMFold file's")
        return ConfidenceHeads(plddt, ptm, why_plddt, why_ptm)
    if cfg is None:
        raise ValueError("confidence_heads needs a run's config, or esmfold=True")
    pretrained = _file_heads(record, "the pretrained ESMFold's (model.init_from), not trained in the run:") \
        if cfg.model.get("init_from") else None
    if head_trained_in_run(cfg, "lddt_head"):
        plddt = (CA_ONLY, "trained in the run by the pLDDT-Cα loss (loss.plddt.weight > 0), Cα only")
    else:
        plddt = pretrained[0] if pretrained else (None, f"the run's pLDDT head was never trained "
                                                        f"({_why_not(cfg, 'lddt_head')})")
    if head_trained_in_run(cfg, "ptm_head"):
        ptm = (True, "trained in the run (loss.tm.weight > 0)")
    else:
        ptm = pretrained[1] if pretrained else (False, f"the run's pTM head was never trained "
                                                       f"({_why_not(cfg, 'ptm_head')})")
    return ConfidenceHeads(plddt[0], ptm[0], plddt[1], ptm[1])


def model_heads(model, cfg=None) -> ConfidenceHeads:
    """The confidence heads of a loaded model: a run's (its config `cfg`) or, with `cfg` None, an ESMFold file's;
    the file record the loader kept on the model (`confidence_record`) is used where the heads came from a file."""
    return confidence_heads(cfg, esmfold=cfg is None, record=getattr(model, "confidence_record", None))
