"""`evomerge merge` commands."""

from evomerge.cli import app  # noqa: F401
