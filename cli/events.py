"""``berth events``: what happens in the cluster, as it happens."""

from __future__ import annotations

import datetime as dt
import json
import sys

import grpc
import typer

from berth.cli.client import Client
from berth.cli.render import OutputFormat, resolve
from berth.proto.berth.v1 import cluster_pb2

app = typer.Typer()


def event_dict(event: cluster_pb2.Event) -> dict[str, object]:
    return {
        "time": dt.datetime.fromtimestamp(event.time, dt.UTC).isoformat(timespec="milliseconds"),
        "kind": event.kind,
        "node": event.node,
        "node_id": event.node_id,
        "service": event.service,
        "task": event.task,
        "message": event.message,
    }


def event_line(event: cluster_pb2.Event) -> str:
    when = dt.datetime.fromtimestamp(event.time, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    subject = " ".join(
        p
        for p in (
            f"node={event.node}" if event.node else "",
            f"task={event.task}" if event.task else (f"service={event.service}" if event.service else ""),
        )
        if p
    )
    return f"{when}  {event.kind:<16} {subject}  {event.message}".rstrip()


@app.command()
def events(
    output: OutputFormat = typer.Option(
        OutputFormat.auto, "--output", "-o", help="table (lines), json (one object a line)."
    ),
) -> None:
    """Stream cluster events (node down/up, task placed/started/lost/stopped, ...) until Ctrl-C."""
    client = Client()
    as_json = resolve(output) is OutputFormat.json
    stream = client.stub.WatchEvents(cluster_pb2.WatchEventsRequest())
    try:
        for event in stream:
            print(json.dumps(event_dict(event)) if as_json else event_line(event), flush=True)
    except KeyboardInterrupt:
        stream.cancel()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            print(f"error: event stream ended: {exc.details()}", file=sys.stderr)
            raise typer.Exit(1) from None
