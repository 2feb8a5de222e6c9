"""bnbench: what batch normalization buys a network, measured.

Subpackages, by concern (data flows down this list; tests/test_structure.py enforces it):
  train/      data, models, the engine, optimizers, the hand-written step, instruments, memory
  dist/       the process mesh: layout, launching, process groups, cross-process BN
  store/      the results folder: rows, meta, provenance, trackers
  sweeps/     sweep files, the local and SLURM executors
  reporting/  statistics, figures, the HTML report
Top level: config (one declaration per setting), cli, training (training_function), main_job.
"""
__version__ = "0.1.0"
