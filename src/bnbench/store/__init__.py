"""The results folder: rows appended atomically, run records, provenance, live trackers."""
