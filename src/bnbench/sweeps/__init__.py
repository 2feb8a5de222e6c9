"""Sweeps: sweep files planned into units, run into one folder locally or as SLURM jobs, resumable."""
