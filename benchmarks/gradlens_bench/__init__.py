"""Benchmarks for gradlens; run ``python -m gradlens_bench.run --help``."""
