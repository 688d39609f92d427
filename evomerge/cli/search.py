"""`evomerge search` commands."""

from evomerge.cli import app  # noqa: F401
