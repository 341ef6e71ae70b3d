"""The package version, in one place (the CLI reads it without loading the API)."""

__version__ = "0.1.0"
