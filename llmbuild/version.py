"""llmbuild's version, importable from any layer (`llmbuild.__version__` is this value)."""

__version__ = "0.1.0"
