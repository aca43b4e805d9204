"""Benchmark scripts (run with ``python -m benchmark.bench.<name>``); not part of the test suite."""
