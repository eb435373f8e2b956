"""The benchmark harness of gradlens (docs/benchmarks.md).

Not named ``benchmarks``: Opacus installs a top-level package of that name. From
the repository root run ``python benchmarks/gradlens_bench/run.py --help``, or
``python -m gradlens_bench.run --help`` with ``benchmarks/`` on the path.
"""
