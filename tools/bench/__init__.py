"""Benchmark scripts (run with ``python -m tools.bench.<name>``); not part of the test suite."""
