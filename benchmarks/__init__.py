"""Benchmarks for gradlens; run ``python -m benchmarks.run --help``."""
