"""The package version, in the core so that any layer (artifacts, caches keyed by version) can read it."""
__version__ = "0.1.0"
