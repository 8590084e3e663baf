"""``berth service``: declare, inspect, scale and remove services."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from berth.cli.client import Client
from berth.cli.errors import CliError, InputError
from berth.cli.render import OutputFormat, emit
from berth.cli.spec import (
    NETWORKS,
    ON_DISCONNECT,
    RESTARTS,
    STRATEGIES,
    choice,
    load_file,
    parse_constraint,
    parse_env,
    parse_port,
    parse_replicas,
    parse_resource,
    quantity,
)
from berth.cli.views import service_row, task_row
from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

app = typer.Typer(help="Declare and manage services (N replicas of one image).", no_args_is_help=True)

OUTPUT = typer.Option(OutputFormat.auto, "--output", "-o", help="table, json, or auto (table on a terminal).")
WAIT = typer.Option(False, "--wait", help="Wait until every replica runs, showing progress.")
TIMEOUT = typer.Option(120.0, "--timeout", help="With --wait: give up after this many seconds.")


def wait_running(client: Client, name: str, timeout: float) -> None:
    """Poll until all of a service's replicas run; progress on stderr, one line per change."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        service = client.call(client.stub.GetService, cluster_pb2.GetServiceRequest(name=name))
        tasks = client.call(client.stub.ListTasks, cluster_pb2.ListTasksRequest(service=name)).tasks
        rows = [task_row(t) for t in tasks]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        desired = service.service.spec.replicas
        line = (
            f"{name}: {service.running}/{desired} running ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + ")"
        )
        if line != last:
            print(line, file=sys.stderr)
            last = line
        if service.running == desired and len(rows) == desired:
            return
        if time.monotonic() > deadline:
            waiting = [r for r in rows if r["state"] != "running"]
            detail = "; ".join(f"{r['id']} {r['state']}: {r['reason']}" for r in waiting[:3])
            raise CliError(
                f"{name}: only {service.running}/{desired} running after {timeout:.0f}s ({detail})"
            )
        time.sleep(0.5)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Service name: lowercase letters, digits and '-'."),
    command: list[str] = typer.Argument(None, help="After `--`: arguments replacing the image's CMD."),
    image: str = typer.Option(..., "--image", help="Image reference, e.g. 10.210.0.1:5000/portal:1.0."),
    replicas: int = typer.Option(1, "--replicas", "-r", help="How many copies to run."),
    cpu: str = typer.Option("", "--cpu", help="CPU per replica: 250m, 0.5 or 2 (cores)."),
    memory: str = typer.Option("", "--memory", help="Memory limit per replica: 64Mi, 1Gi."),
    port: list[str] = typer.Option(
        [], "--port", "-p", help="Publish: 8080 (dynamic host port) or 80:8080; repeat."
    ),
    env: list[str] = typer.Option([], "--env", "-e", help="Environment KEY=VALUE; repeat."),
    constraint: list[str] = typer.Option(
        [], "--constraint", help="Placement rule on node labels: key==value or key!=value."
    ),
    network: str = typer.Option(
        "bridge", "--network", help="bridge (own namespace) or host (the host's stack)."
    ),
    restart: str = typer.Option("always", "--restart", help="always, on-failure or never."),
    resource: list[str] = typer.Option(
        [], "--resource", help="Named resource per replica NAME=AMOUNT (gpu=1, disk=10Gi); repeat."
    ),
    max_per_node: int = typer.Option(
        0, "--max-per-node", help="At most this many replicas on one node (0: no limit)."
    ),
    spread: list[str] = typer.Option(
        [], "--spread", help="Spread replicas across the values of this node label."
    ),
    strategy: str = typer.Option(
        "binpack", "--strategy", help="binpack (fill fullest node) or spread (emptiest)."
    ),
    on_disconnect: str = typer.Option(
        "keep",
        "--on-disconnect",
        help="keep (run on; replaced elsewhere when the node is declared down) or stop "
        "(at-most-one: the cut-off agent stops it before any replacement starts, and updates "
        "and drains stop the old copy before the new one starts).",
    ),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
) -> None:
    """Create a service; the controller places its replicas on nodes.

    Example: berth service create web --image REG/portal:1.0 --replicas 3 --cpu 250m --memory 64Mi --port 8080
    """
    spec = pb.ServiceSpec(name=name, image=image, replicas=parse_replicas(replicas), args=command or [])
    if cpu:
        spec.resources.cpu_millis = quantity("--cpu", cpu, parse_cpu)
    if memory:
        spec.resources.memory_bytes = quantity("--memory", memory, parse_memory)
    spec.ports.extend(parse_port(p, f"--port {p}") for p in port)
    spec.env.update(parse_env(env, "--env"))
    spec.constraints.extend(parse_constraint(c, "--constraint") for c in constraint)
    spec.network = choice("--network", network, NETWORKS)  # type: ignore[assignment]
    spec.restart = choice("--restart", restart, RESTARTS)  # type: ignore[assignment]
    for item in resource:
        name, amount = parse_resource(item, "--resource")
        spec.resources.scalars[name] = amount
    spec.max_per_node = parse_replicas(max_per_node, "--max-per-node")
    spec.spread.extend(spread)
    spec.strategy = choice("--strategy", strategy, STRATEGIES)  # type: ignore[assignment]
    spec.on_disconnect = choice("--on-disconnect", on_disconnect, ON_DISCONNECT)  # type: ignore[assignment]
    client = Client()
    service = client.call(client.stub.CreateService, cluster_pb2.CreateServiceRequest(spec=spec))
    typer.echo(service.spec.name)
    if wait:
        wait_running(client, name, timeout)


@app.command("apply")
def apply(
    file: Path = typer.Option(
        ..., "--file", "-f", help="YAML spec file (several documents allowed; - for stdin)."
    ),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
) -> None:
    """Create or update services from a YAML file; applying the same file twice changes nothing."""
    specs = load_file(file)
    client = Client()
    for spec in specs:
        result = client.call(client.stub.ApplyService, cluster_pb2.ApplyServiceRequest(spec=spec))
        verb = "created" if result.created else ("updated" if result.changed else "unchanged")
        typer.echo(f"service/{spec.name} {verb}")
    if wait:
        for spec in specs:
            wait_running(client, spec.name, timeout)


@app.command("ls")
def ls(output: OutputFormat = OUTPUT) -> None:
    """List services with running/desired replicas."""
    client = Client()
    response = client.call(client.stub.ListServices, cluster_pb2.ListServicesRequest())
    rows = [service_row(v) for v in response.services]
    emit(
        output,
        rows,
        [
            ("name", "NAME"),
            ("image", "IMAGE"),
            ("replicas", "REPLICAS"),
            ("pending", "PENDING"),
            ("cpu", "CPU"),
            ("memory", "MEMORY"),
            ("ports", "PORTS"),
        ],
    )


@app.command("ps")
def ps(name: str = typer.Argument(..., help="Service name."), output: OutputFormat = OUTPUT) -> None:
    """Show a service's tasks: where each runs, its state, why it waits, and where it answers."""
    client = Client()
    response = client.call(client.stub.ListTasks, cluster_pb2.ListTasksRequest(service=name))
    rows = [task_row(v) for v in response.tasks]
    emit(
        output,
        rows,
        [
            ("id", "ID"),
            ("slot", "SLOT"),
            ("node", "NODE"),
            ("state", "STATE"),
            ("address", "ADDRESS"),
            ("restarts", "RESTARTS"),
            ("reason", "REASON"),
        ],
    )


@app.command("scale")
def scale(
    assignments: list[str] = typer.Argument(..., help="NAME=REPLICAS, one or more."),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
) -> None:
    """Change how many replicas run, e.g. `berth service scale portal=9`."""
    parsed = []
    for item in assignments:
        name, sep, count = item.partition("=")
        if not sep or not name:
            raise InputError(f"scale: {item!r} is not NAME=REPLICAS, e.g. portal=9")
        try:
            value = int(count)
        except ValueError:
            raise InputError(f"replicas: {count!r} is not a whole number (in {item!r})") from None
        parsed.append((name, parse_replicas(value)))
    client = Client()
    for name, value in parsed:
        client.call(client.stub.ScaleService, cluster_pb2.ScaleServiceRequest(name=name, replicas=value))
        typer.echo(f"service/{name} scaled to {value}")
    if wait:
        for name, _ in parsed:
            wait_running(client, name, timeout)


@app.command("rm")
def rm(names: list[str] = typer.Argument(..., help="Service names.")) -> None:
    """Remove services; their containers are stopped and cleaned up on every node."""
    client = Client()
    for name in names:
        client.call(client.stub.RemoveService, cluster_pb2.RemoveServiceRequest(name=name))
        typer.echo(f"service/{name} removed")
