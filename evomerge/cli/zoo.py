"""`evomerge zoo` commands."""

from evomerge.cli import app  # noqa: F401
