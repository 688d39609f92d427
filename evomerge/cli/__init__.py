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

import errno
import importlib
import sqlite3
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


def _click_classes(name: str) -> tuple[type, ...]:
    """``name`` from click and from the click that typer bundles (``typer._click``), whichever exist:
    typer ≥ 0.20 raises its own copy's exceptions, which plain ``click``'s classes never catch."""
    mods = [click.exceptions]
    try:
        from typer._click import exceptions as bundled  # typer's vendored click

        mods.append(bundled)
    except ImportError:  # pragma: no cover - older typer uses click itself
        pass
    extra = {"Exit": [typer.Exit], "Abort": [typer.Abort]}.get(name, [])
    return tuple(dict.fromkeys([*(getattr(m, name) for m in mods if hasattr(m, name)), *extra]))


def _environment_error(e: BaseException) -> EvomergeError | None:
    """A full disk, a read-only file system, a denied permission, ... as one line; None for a bug."""
    from evomerge.outputs import _ADVICE, os_error, sqlite_error

    if isinstance(e, sqlite3.Error):
        return sqlite_error(e)
    if isinstance(e, OSError) and e.errno in _ADVICE and e.errno != errno.ENOENT:
        return os_error(e, e.filename or "a file", "write" if e.errno in (errno.ENOSPC, errno.EROFS) else "access")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn user errors into one clear line and exit code 2.

    Usage errors (a missing option, a bad flag value) print click's usual usage message and exit
    with click's code 2. All user text is escaped before it reaches rich, so a path such as
    ``[/x]`` is printed, not parsed as markup.
    """
    _load_commands()
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = app(args=args, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except EvomergeError as e:
        if _state["debug"] or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {escape(' '.join(str(e).split()))}", highlight=False,
                          soft_wrap=True)
        return e.exit_code
    except (OSError, sqlite3.Error) as e:  # the environment refused a write (disk full, read-only, ...)
        mapped = _environment_error(e)
        if mapped is None or _state["debug"] or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(mapped))}", highlight=False, soft_wrap=True)
        return mapped.exit_code
    except _click_classes("Exit") as e:
        return getattr(e, "exit_code", 0)
    except _click_classes("Abort"):
        err_console.print("aborted")
        return 130
    except _click_classes("ClickException") as e:
        if _state["debug"] or "--debug" in args:
            raise
        e.show()
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
