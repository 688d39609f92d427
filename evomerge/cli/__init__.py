"""The ``evomerge`` command line: one typer app, one module per command group.

Every command module registers itself on :data:`app`. User errors (:class:`EvomergeError`)
print one line and exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary search over model-merge recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

# Command modules, each adding its commands to `app` on import.
COMMAND_MODULES = ("merge", "recipe", "zoo", "eval", "search", "plan", "map", "report", "demo")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _load_commands() -> None:
    for mod in COMMAND_MODULES:
        importlib.import_module(f"evomerge.cli.{mod}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn user errors into one clear line and exit code 2."""
    _load_commands()
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = app(args=args, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except EvomergeError as e:
        if _state["debug"] or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
