"""``berth agent``: wiring only (identity, runtime, task manager, session)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from pathlib import Path

import typer

from berth.agent import capacity
from berth.agent.logs import setup_logging
from berth.agent.metrics import (
    DEFAULT_METRICS_PORT,
    AgentMetrics,
    advertised,
    join_host_port,
    manager_tasks,
    parse_listen,
)
from berth.agent.runc import RuncRuntime
from berth.agent.session import Identity, Session
from berth.agent.tasks import TaskManager
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

log = logging.getLogger("berth.agent")
VERSION = "0.1.0"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def load_node_id(state_dir: Path) -> str:
    """A stable node id kept in the state dir, so a restarted agent is the same node."""
    path = state_dir / "node-id"
    if path.exists():
        return path.read_text().strip()
    node_id = secrets.token_hex(6)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.rename(path)
    return node_id


def parse_labels(labels: list[str]) -> dict[str, str]:
    parsed = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        parsed[key] = value
    return parsed


def parse_resources(items: list[str]) -> dict[str, int]:
    parsed = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(f"{item!r} is not NAME=AMOUNT")
            if name in ("cpu", "memory"):
                raise ValueError(
                    f"{name} is measured on the host (--cpus / --memory override it); "
                    "--resource declares other resources, e.g. gpu=2 or disk=100Gi"
                )
            parsed[name] = parse_memory(amount)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--resource") from None
    return parsed


async def run(session: Session, manager: TaskManager) -> None:
    recovered = await manager.recover()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(session.run_forever(recovered))
    await stop.wait()
    log.info("agent stopping; containers keep running and are re-adopted on restart")
    runner.cancel()
    await manager.close()


@app.command()
def main(
    controller: str = typer.Option("127.0.0.1:7070", help="Controller gRPC address (host:port)."),
    name: str = typer.Option(..., help="Node name, unique in the cluster."),
    address: str = typer.Option(
        "", help="This host's address, where published ports answer. Default: detected."
    ),
    cpus: str = typer.Option("", help="CPU capacity to offer (e.g. 2 or 1500m). Default: detected."),
    memory: str = typer.Option("", help="Memory capacity to offer (e.g. 4Gi). Default: detected."),
    label: list[str] = typer.Option([], help="Node label KEY=VALUE; repeat for several."),
    resource: list[str] = typer.Option(
        [], help="Named resource this host offers NAME=AMOUNT (gpu=2, disk=100Gi); not cpu or memory."
    ),
    state_dir: Path = typer.Option(
        Path("/var/lib/berth/agent"), help="Where images, bundles and the node id live."
    ),
    subnet: str = typer.Option(
        "10.220.0.0/24", help="This host's container subnet (bridge gets the first address)."
    ),
    bridge: str = typer.Option("berth0", help="Name of the container bridge on this host."),
    cgroup_parent: str = typer.Option("berth", help="cgroup parent for this agent's containers."),
    nft_table: str = typer.Option("berth", help="nftables table this agent owns (NAT, published ports)."),
    insecure_registry: list[str] = typer.Option(
        [], help="Registry host:port reached over plain HTTP; repeat."
    ),
    metrics_listen: str | None = typer.Option(
        None,
        help=f"Where to serve Prometheus /metrics (HOST:PORT). Default: <address>:{DEFAULT_METRICS_PORT}; "
        '"" disables it.',
        show_default=False,
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the Berth agent: registers this host and runs the containers assigned to it."""
    setup_logging(log_level)
    try:
        cpu_millis = parse_cpu(cpus) if cpus else capacity.detect_cpu_millis()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cpus") from None
    try:
        memory_bytes = parse_memory(memory) if memory else capacity.detect_memory_bytes()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory") from None
    labels = parse_labels(label)
    scalars = parse_resources(resource)
    state_dir.mkdir(parents=True, exist_ok=True)
    node_id = load_node_id(state_dir)
    runtime = RuncRuntime(
        state_dir=state_dir,
        cgroup_parent=cgroup_parent,
        bridge=bridge,
        subnet=subnet,
        nft_table=nft_table,
        insecure_registries=insecure_registry,
    )
    address = address or capacity.detect_address()
    try:
        listen = parse_listen(
            f"{address}:{DEFAULT_METRICS_PORT}" if metrics_listen is None else metrics_listen, address
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--metrics-listen") from None
    metrics = AgentMetrics(name, version=VERSION)
    metrics_address = ""
    if listen is not None:
        try:
            port = metrics.serve(*listen)
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot listen on {join_host_port(*listen)}: {exc.strerror or exc}",
                param_hint="--metrics-listen",
            ) from None
        metrics_address = advertised(listen[0], port, address)
        log.info("serving metrics at http://%s/metrics", metrics_address)
    identity = Identity(
        node_id=node_id,
        name=name,
        address=address,
        capacity=pb.Resources(cpu_millis=cpu_millis, memory_bytes=memory_bytes, scalars=scalars),
        labels=labels,
        metrics_address=metrics_address,
        version=VERSION,
    )

    async def start() -> None:
        session_ref: list[Session] = []
        manager = TaskManager(
            runtime,
            node_id=node_id,
            node_name=name,
            report=lambda status: session_ref[0].report(status),
            on_pull=metrics.observe_pull,
        )
        session = Session(controller, identity, manager, ack_file=state_dir / "last-heartbeat-ack")
        session_ref.append(session)
        metrics.watch(lambda: manager_tasks(manager), runtime.cgroups, lambda: session.last_rtt)
        try:
            await run(session, manager)
        finally:
            metrics.close()

    log.info("agent starting name=%s node=%s address=%s", name, node_id, identity.address)
    asyncio.run(start())


if __name__ == "__main__":
    app()
