"""`evomerge report` commands."""

from evomerge.cli import app  # noqa: F401
