"""The gradlens version, read by the package, its provenance and ``pyproject.toml``."""

__version__ = "0.2.0"
