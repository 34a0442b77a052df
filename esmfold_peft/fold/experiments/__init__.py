"""Experiments made of runs: the staged α search, sweeps over adapters × ranks, their tables, and the evaluation of a run on a split."""
