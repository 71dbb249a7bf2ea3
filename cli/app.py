"""Wires the ``probe`` commands together; each command lives in its own module."""

import typer

from .layers import layers_command
from .run import demo_command, run_command
from .sweep import report_command, sweep_command

app = typer.Typer(
    help="Linear classifier probes on every layer of a neural network: where does the information become "
    "linearly readable?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("layers")(layers_command)
app.command("run")(run_command)
app.command("demo")(demo_command)
app.command("sweep")(sweep_command)
app.command("report")(report_command)


def main() -> None:
    app()
