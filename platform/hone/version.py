"""hone's version, below every other module: the registry's lineage tags and the served OpenAPI document read it
without importing the package root (which imports every stage). Kept equal to ``pyproject.toml``'s (a test checks)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
