"""Benchmarks: pytest-benchmark suites (``python -m pytest benchmarks/test_bench_*.py``) and a markdown
report (``python -m benchmarks.report``). Not part of the CI test run (``testpaths = ["tests"]``)."""
