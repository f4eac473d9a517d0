"""The package version (one definition; the root package and provenance records read it)."""

__version__ = "0.1.0"
