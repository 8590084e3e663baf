"""``berth node``: the hosts in the cluster."""

from __future__ import annotations

import typer

from berth.cli.client import Client
from berth.cli.render import OutputFormat, emit
from berth.cli.views import node_row
from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb

app = typer.Typer(help="Inspect and manage the nodes (hosts running an agent).", no_args_is_help=True)

NODE = typer.Argument(..., help="Node name or id.")


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


def _set(node: str, availability: pb.NodeAvailability.ValueType, verb: str) -> None:
    client = Client()
    view = client.call(
        client.stub.SetNodeAvailability,
        cluster_pb2.SetNodeAvailabilityRequest(node=node, availability=availability),
    )
    typer.echo(f"node/{view.node.name} {verb}")


@app.command("drain")
def drain(node: str = NODE) -> None:
    """Move every task off the node: each replacement starts elsewhere before the old one stops.

    At-most-one services (on_disconnect: stop) move stop first: the old copy stops once another
    node can take the new one, and the new one starts once the old one has stopped."""
    _set(node, pb.NODE_AVAILABILITY_DRAIN, "draining")


@app.command("pause")
def pause(node: str = NODE) -> None:
    """Place nothing new on the node; what runs there keeps running."""
    _set(node, pb.NODE_AVAILABILITY_PAUSE, "paused")


@app.command("activate")
def activate(node: str = NODE) -> None:
    """Make a drained or paused node take tasks again."""
    _set(node, pb.NODE_AVAILABILITY_ACTIVE, "active")


@app.command("rm")
def rm(nodes: list[str] = typer.Argument(..., help="Names or ids of nodes that are down.")) -> None:
    """Forget nodes that are down (their tasks are placed elsewhere).

    One holding at-most-one tasks only after its deadline plus margin (the error says when)."""
    client = Client()
    for node in nodes:
        client.call(client.stub.RemoveNode, cluster_pb2.RemoveNodeRequest(node=node))
        typer.echo(f"node/{node} removed")
