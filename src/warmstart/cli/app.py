"""The ``warmstart`` command."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from warmstart.cli.output import err_console
from warmstart.errors import WarmstartError

app = typer.Typer(
    name="warmstart",
    help="Checkpoint a warmed GPU inference worker once; restore replicas from it in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(exc: WarmstartError) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise SystemExit(exc.exit_code)


def main(argv: list[str] | None = None) -> None:
    from warmstart.cli import agent, commands, doctor, gms, remote, workers  # noqa: F401  (they register themselves)
    from warmstart.cli.via_agent import expand_agent_flag

    argv = expand_agent_flag(sys.argv[1:] if argv is None else argv)  # a bare --agent: default socket
    try:
        app(args=argv, prog_name="warmstart", standalone_mode=True)
    except WarmstartError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err_console.print("error: interrupted")
        sys.exit(130)
