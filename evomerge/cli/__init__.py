"""The ``evomerge`` command line: one typer app, one module per command group.

Every command module registers itself on :data:`app`. User errors (:class:`EvomergeError`)
print one line and exit with code 2; ``--debug`` shows the traceback instead.

Conventions every command follows (tests/test_cli.py checks them):

* one meaning per short flag: ``-o/--out`` an output file or directory, ``-r/--run-dir`` a run
  directory, ``-t/--task`` an objective (``TASK[:split]``, repeatable and comma-separated),
  ``-p/--preset`` a zoo preset, ``-k/--kind`` a MAP kind, ``-q/--quiet`` no live display;
* boolean options are plain flags (``--force``, never ``--force true``), shown without a type;
* ``--json`` (``eval``, ``runs list``, ``runs show``, ``pareto``, ``plan``) prints one JSON document to
  stdout and nothing else there; its keys are documented on each command;
* without a terminal (logs, CI), long steps print plain periodic progress lines to stderr.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperOption

from evomerge import __version__
from evomerge.errors import EvomergeError


def _plain_flag_type(display_type_rich):
    """Help shows no ``<bool>`` type next to a flag: ``--force`` takes no value."""
    def display(self, ctx):
        return None if self.is_flag and self.metavar is None else display_type_rich(self, ctx)
    return display


if hasattr(TyperOption, "display_type_rich"):  # typer >= 0.16 renders each option's type
    TyperOption.display_type_rich = _plain_flag_type(TyperOption.display_type_rich)

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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"evomerge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
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
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
