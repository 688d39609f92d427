"""`evomerge recipe` commands."""

from evomerge.cli import app  # noqa: F401
