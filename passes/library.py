"""Importing this module registers every built-in pass."""
from . import cleanup, fusion, legalize, mla, moe  # noqa: F401
