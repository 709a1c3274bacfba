"""Benchmarks: a local instant upstream, a minimal pass-through baseline, and the runner (``run.py``)."""
