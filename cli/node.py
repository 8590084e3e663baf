"""``berth node``: the hosts in the cluster."""

from __future__ import annotations

import typer
from berth.cli.client import Client
from berth.cli.render import OutputFormat, emit
from berth.cli.views import node_row
from berth.proto.berth.v1 import cluster_pb2

app = typer.Typer(help="Inspect the nodes (hosts running an agent).", no_args_is_help=True)


@app.command("ls")
def ls(
    output: OutputFormat = typer.Option(OutputFormat.auto, "--output", "-o", help="table, json or auto."),
) -> None:
    """List nodes with state, availability, and allocated/total CPU and memory."""
    client = Client()
    response = client.call(client.stub.ListNodes, cluster_pb2.ListNodesRequest())
    rows = [node_row(v) for v in response.nodes]
    emit(
        output,
        rows,
        [
            ("id", "ID"),
            ("name", "NAME"),
            ("address", "ADDRESS"),
            ("state", "STATE"),
            ("availability", "AVAILABILITY"),
            ("cpu", "CPU"),
            ("memory", "MEMORY"),
            ("tasks", "TASKS"),
            ("labels", "LABELS"),
        ],
    )
