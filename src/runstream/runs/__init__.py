"""Runs: declared tasks, the run lifecycle, run records and their execution."""
