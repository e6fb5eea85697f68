"""The `normsurgery` command line: one Typer app; the commands, one module each under `normsurgery.commands`, are
registered here."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from normsurgery.errors import NormSurgeryError

app = typer.Typer(
    name="normsurgery",
    help="Post-training surgery on transformer normalization layers and depth, verified against the original.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

stderr = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from normsurgery import __version__

        print(f"normsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Post-training surgery on transformer normalization layers and depth, verified against the original."""
INTERRUPTED = 130  # the shell's exit status for Ctrl-C


def _register() -> None:
    """Add the commands to `app`, once, in the order `--help` lists them. The command modules do not know the app:
    nothing below the CLI imports it."""
    if app.registered_commands:
        return
    from normsurgery.commands import adapt, check, evaluate, inspect, models, prune, rewrite, run

    app.command()(check.check)
    app.command("eval")(evaluate.eval_command)
    app.command()(inspect.inspect)
    app.add_typer(models.models_app, name="models")
    for command in (prune.prune, prune.diagnose, rewrite.fold, rewrite.convert, run.run):
        app.command()(command)
    app.command()(adapt.adapt)


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one paragraph and an exit code."""
    _register()
    try:
        code = app(standalone_mode=False)  # click returns a typer.Exit's code instead of raising it
        if code == INTERRUPTED:  # typer turns Ctrl-C into Exit(130), after the writers have cleaned up
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except NormSurgeryError as err:
        stderr.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/bold red]: nothing was written.")
        sys.exit(INTERRUPTED)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as err:  # usage errors: bad option, unknown choice, missing argument
        show = getattr(err, "show", None)
        if show:
            show()
        else:
            stderr.print(f"[bold red]error:[/bold red] {escape(str(err))}")
        sys.exit(getattr(err, "exit_code", 2))


def entry() -> None:
    """`normsurgery` and `python -m normsurgery`: run `main`, then leave without the interpreter's teardown.

    Tearing down torch and transformers costs about a second per command; by the time `main` returns every
    output is closed, synced and renamed, so there is nothing left for the teardown to do.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
