"""The package version: one place, imported by whoever needs it (no import of the package root)."""

__version__ = "0.1.0"
