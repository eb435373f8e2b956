"""Benchmarks for gradlens; run ``python -m benchmarks.bench_probes --help``."""
