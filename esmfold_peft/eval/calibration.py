"""Is the confidence right? Correlation of predicted with observed accuracy, and reliability (calibration).

Per chain: Pearson and Spearman correlation of mean pLDDT with LDDT-Cα, with the number of chains and
a 95% interval by Fisher's z (standard error 1/√(n−3) for Pearson; 1.06/√(n−3) for Spearman, Fieller
et al. 1957). Below `MIN_CHAINS` chains, or when the predicted values barely vary (standard deviation
under `MIN_SPREAD`), no coefficient is given: the result says why instead.

Per residue: a reliability diagram, pLDDT/100 in 10 equal bins of [0, 1] against the mean observed
per-residue LDDT-Cα of the residues in each bin, and the expected calibration error
ECE = Σ_bins (n_bin / n) · |mean predicted − mean observed|. A perfectly calibrated model has
ECE 0; one that says 0.9 where it is 0.5 right has ECE 0.4. Below `MIN_RESIDUES` residues no ECE is
given. The same functions serve pTM against TM-score (one value per chain).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

MIN_CHAINS = 10  # fewer chains than this give no correlation coefficient
MIN_SPREAD = 0.01  # predicted values (0..1) with a smaller standard deviation give none either (1 pLDDT point)
MIN_RESIDUES = 100  # fewer residues give no ECE
N_BINS = 10
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Correlation:
    """Correlation of a predicted with an observed score over `n` items (chains).

    `pearson_r`, `spearman_rho` and their 95% intervals are None when `caveat` says why there are none.
    """

    n: int
    pearson_r: Optional[float]
    pearson_ci95: Optional[tuple[float, float]]
    spearman_rho: Optional[float]
    spearman_ci95: Optional[tuple[float, float]]
    predicted_sd: Optional[float]
    caveat: Optional[str]

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("pearson_ci95", "spearman_ci95"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Correlation":
        """The inverse of `as_dict` (extra keys, as report.json's pTM section has, are ignored)."""
        values = {k: d[k] for k in cls.__dataclass_fields__}
        for key in ("pearson_ci95", "spearman_ci95"):
            values[key] = None if values[key] is None else tuple(values[key])
        return cls(**values)

    def text(self, what: str) -> str:
        """One line for a report, the sample size always in it."""
        if self.caveat:
            return f"{what}: no correlation given ({self.caveat})"
        (pl, ph), (sl, sh) = self.pearson_ci95, self.spearman_ci95
        return (f"{what}: Pearson r {self.pearson_r:.3f} (95% CI {pl:.3f} to {ph:.3f}), Spearman ρ "
                f"{self.spearman_rho:.3f} (95% CI {sl:.3f} to {sh:.3f}), n = {self.n} chains")


def _fisher_interval(r: float, n: int, se_factor: float) -> tuple[float, float]:
    if abs(r) >= 1.0:
        return (float(r), float(r))
    z, half = math.atanh(r), Z_95 * se_factor / math.sqrt(n - 3)
    return (math.tanh(z - half), math.tanh(z + half))


def correlation(predicted: Sequence[float], observed: Sequence[float], min_n: int = MIN_CHAINS,
                min_spread: float = MIN_SPREAD) -> Correlation:
    """Pearson and Spearman of `predicted` (0..1) against `observed` (0..1), with n and 95% intervals.

    Pairs with a non-finite member are left out. No coefficient (a caveat instead) below `min_n`
    pairs, when the predicted values' standard deviation is under `min_spread`, or when the observed
    values are constant.
    """
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    sd = float(np.std(x)) if n else None
    caveat = None
    if n < max(min_n, 4):
        caveat = f"n = {n}, fewer than {max(min_n, 4)} chains"
    elif sd < min_spread:
        caveat = (f"n = {n}, but the predicted values hardly vary (standard deviation {sd:.4f} < {min_spread:g}, "
                  "on the 0..1 scale)")
    elif np.ptp(y) == 0:
        caveat = f"n = {n}, but the observed values are all equal"
    if caveat:
        return Correlation(n, None, None, None, None, sd, caveat)
    r = float(stats.pearsonr(x, y).statistic)
    rho = float(stats.spearmanr(x, y).statistic)
    return Correlation(n, r, _fisher_interval(r, n, 1.0), rho, _fisher_interval(rho, n, 1.06), sd, None)


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram over `n` residues: per bin of predicted confidence, its count, mean predicted and
    mean observed; and the expected calibration error (None, with a caveat, below `MIN_RESIDUES`)."""

    n: int
    bin_edges: list[float]
    bin_counts: list[int]
    mean_predicted: list[Optional[float]]
    mean_observed: list[Optional[float]]
    ece: Optional[float]
    caveat: Optional[str]

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, what: str) -> str:
        if self.caveat:
            return f"{what}: no calibration error given ({self.caveat})"
        return f"{what}: expected calibration error {self.ece:.3f} over n = {self.n} residues ({len(self.bin_counts)} bins)"

    def table(self) -> list[str]:
        """Markdown rows: bin, residues, mean predicted, mean observed."""
        rows = ["| predicted (pLDDT/100) | residues | mean predicted | mean observed |", "|---|---:|---:|---:|"]
        for lo, hi, count, p, o in zip(self.bin_edges, self.bin_edges[1:], self.bin_counts, self.mean_predicted,
                                       self.mean_observed):
            cells = ("–", "–") if count == 0 else (f"{p:.3f}", f"{o:.3f}")
            rows.append(f"| {lo:.1f}–{hi:.1f} | {count} | {cells[0]} | {cells[1]} |")
        return rows


def reliability(predicted: Sequence[float], observed: Sequence[float], n_bins: int = N_BINS,
                min_n: int = MIN_RESIDUES) -> Reliability:
    """Reliability diagram and ECE of `predicted` (0..1; pLDDT/100) against `observed` (0..1; LDDT-Cα).

    Bins are equal in width over [0, 1]; the last one includes 1. Non-finite pairs are left out.
    """
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = np.clip(x[keep], 0.0, 1.0), y[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.minimum(np.searchsorted(edges, x, side="right") - 1, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    sums_x = np.bincount(which, weights=x, minlength=n_bins)
    sums_y = np.bincount(which, weights=y, minlength=n_bins)
    mean_x = [float(s / c) if c else None for s, c in zip(sums_x, counts)]
    mean_y = [float(s / c) if c else None for s, c in zip(sums_y, counts)]
    n = int(len(x))
    caveat = f"n = {n}, fewer than {min_n} residues" if n < min_n else None
    ece = None if caveat else float(np.abs(sums_x - sums_y).sum() / n)  # Σ (n_b/n)|mean_x − mean_y|
    return Reliability(n, [float(e) for e in edges], [int(c) for c in counts], mean_x, mean_y, ece, caveat)


def plot_reliability(diagram: Reliability, path, title: str = "pLDDT reliability") -> Optional[object]:
    """The reliability diagram as a PNG (observed against predicted per bin, the diagonal for reference,
    residue counts as bars); None when there are no residues."""
    if diagram.n == 0:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.subplots()
    centres = [(lo + hi) / 2 for lo, hi in zip(diagram.bin_edges, diagram.bin_edges[1:])]
    width = diagram.bin_edges[1] - diagram.bin_edges[0]
    shares = np.array(diagram.bin_counts) / diagram.n
    ax.bar(centres, shares, width=width * 0.9, color="lightgrey", label="share of residues")
    pts = [(p, o) for p, o in zip(diagram.mean_predicted, diagram.mean_observed) if p is not None]
    ax.plot([p for p, _ in pts], [o for _, o in pts], "o-", color="tab:blue", label="observed LDDT-Cα")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted: pLDDT / 100")
    ax.set_ylabel("observed: per-residue LDDT-Cα")
    ece = "no ECE" if diagram.ece is None else f"ECE {diagram.ece:.3f}"
    ax.set_title(f"{title}\n{ece}, n = {diagram.n} residues", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
