"""``berth``: the command-line entry point.

``berth controller`` and ``berth agent`` hand over to their own programs with ``exec`` (the CLI
never imports the controller or agent packages); every other command talks ClusterAPI to
``BERTH_ADDR`` (default 127.0.0.1:7070), like ``DOCKER_HOST``.
"""

from __future__ import annotations

import os
import sys

import typer

from berth.cli import dev, events, node, plan, service
from berth.cli.errors import CliError

app = typer.Typer(
    name="berth",
    help="Berth: run containerised services across many hosts. Talks to the controller at $BERTH_ADDR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(service.app, name="service")
app.add_typer(node.app, name="node")
app.add_typer(dev.app, name="dev")
app.command("events")(events.events)
app.command("plan")(plan.plan)

PASSTHROUGH = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,
}


def _exec_module(module: str, args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


@app.command("controller", **PASSTHROUGH)  # type: ignore[arg-type]
def controller(ctx: typer.Context) -> None:
    """Run a controller (see `berth controller --help`)."""
    _exec_module("berth.controller", ctx.args)


@app.command("agent", **PASSTHROUGH)  # type: ignore[arg-type]
def agent(ctx: typer.Context) -> None:
    """Run a node agent on this host (see `berth agent --help`)."""
    _exec_module("berth.agent", ctx.args)


def main() -> None:
    try:
        app()
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
