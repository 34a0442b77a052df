"""A run's files: its configuration (named configs, overrides, what a run stores and resumes with), its checkpoints and exported model, and fair-esm ESMFold files read and written."""
