"""``berth dev``: a multi-host Berth cluster on this machine (network namespaces as hosts).

``berth dev up`` starts etcd, a registry (with the example portal image pushed) and a controller in the
root namespace and one agent per host namespace; ``berth dev status`` shows them; ``berth dev down``
removes every trace. Faults for one host: ``kill`` (power loss), ``cut`` (partition), ``heal`` (end the
partition), ``start`` (restart a killed host's agent). Needs root. See ``berth.cli.devcluster`` for the
address plan.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from berth.cli.devcluster import (
    DEFAULT_BASE_DIR,
    DevCluster,
    DevClusterConfig,
    DevClusterError,
    PreflightError,
)
from berth.cli.errors import CliError
from berth.cli.render import OutputFormat, resolve

app = typer.Typer(
    help="A local multi-host dev cluster: etcd, registry, controller and one agent per network-namespace "
    "host. Needs root.",
    no_args_is_help=True,
)

NameOpt = Annotated[str, typer.Option("--name", "-n", help="Cluster name (1-12 lowercase letters/digits).")]
BaseDirOpt = Annotated[Path, typer.Option("--base-dir", help="Where state, logs and data live.")]


def _fail(message: str) -> None:
    # main() prints CliError; when this sub-app runs on its own, print here instead of a traceback.
    raise CliError(message)


def _progress(start: float) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(f"[{time.monotonic() - start:5.1f}s] {line}", file=sys.stderr, flush=True)

    return say


@app.command("up")
def up(
    hosts: Annotated[int, typer.Option("--hosts", help="Number of hosts (network namespaces).")] = 3,
    name: NameOpt = "dev",
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    cpus: Annotated[str | None, typer.Option("--cpus", help="CPUs each agent reports, e.g. 2.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory each agent reports: 2Gi.")] = None,
    etcd_port: Annotated[int, typer.Option("--etcd-port", help="etcd client port (peer: +1).")] = 2379,
    registry_port: Annotated[int, typer.Option("--registry-port")] = 5000,
    controller_port: Annotated[int, typer.Option("--controller-port")] = 7070,
    monitoring: Annotated[
        bool,
        typer.Option(
            "--monitoring",
            help="Also start Prometheus (Debian's package) on 127.0.0.1:--prometheus-port, scraping the "
            "controller and every agent through the controller's /sd, with deploy/prometheus's alert rules.",
        ),
    ] = False,
    prometheus_port: Annotated[int, typer.Option("--prometheus-port")] = 9090,
    subnet_index: Annotated[
        int, typer.Option("--subnet-index", help="0-9: hosts 10.(210+i).0.0/24, containers 10.(220+i).h.0/24")
    ] = 0,
    no_agents: Annotated[bool, typer.Option("--no-agents", help="Start no controller, no agents.")] = False,
    keep_on_failure: Annotated[
        bool, typer.Option("--keep-on-failure", help="Leave a failed cluster in place to inspect its logs.")
    ] = False,
) -> None:
    """Build the cluster and wait until every component is up."""
    try:
        config = DevClusterConfig(
            name=name,
            hosts=hosts,
            base_dir=base_dir,
            host_cpus=cpus,
            host_memory=memory,
            etcd_port=etcd_port,
            registry_port=registry_port,
            controller_port=controller_port,
            monitoring=monitoring,
            prometheus_port=prometheus_port,
            subnet_index=subnet_index,
            start_controller=not no_agents,
            start_agents=not no_agents,
        )
        cluster = DevCluster(config)
    except DevClusterError as e:
        _fail(str(e))
        return
    say = _progress(time.monotonic())
    try:
        cluster.up(progress=say)
    except PreflightError as e:
        _fail(str(e))
        return
    except DevClusterError as e:
        if not keep_on_failure:
            say("failed; removing what was built (use --keep-on-failure to inspect)")
            try:
                cluster.down()
            except DevClusterError as e2:
                say(str(e2))
        _fail(str(e))
        return
    except KeyboardInterrupt:
        say("interrupted; removing what was built")
        cluster.down()
        raise typer.Exit(130) from None
    print(f"export BERTH_ADDR={cluster.controller_address}")
    print(
        f"# metrics: http://{cluster.metrics_address}/metrics  discovery: http://{cluster.metrics_address}/sd"
    )
    if cluster.prometheus_url:
        print(f"# prometheus: {cluster.prometheus_url}  (try: berth_service_running_replicas)")
    if cluster.image:
        print(f"# image: {cluster.image}  (deploy/examples/portal/portal.yaml)")


@app.command("status")
def status(
    name: NameOpt = "dev",
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table, json or auto.")] = (
        OutputFormat.auto
    ),
) -> None:
    """Show the cluster's processes and hosts."""
    try:
        cluster = DevCluster(DevClusterConfig(name=name, base_dir=base_dir))
    except DevClusterError as e:
        _fail(str(e))
        return
    st = cluster.status()
    if resolve(output) is OutputFormat.json:
        print(json.dumps(st, indent=2))
        return
    if not st["up"]:
        _fail(f"dev cluster {name!r} is not up (no {cluster.state_file}); start it with `berth dev up`")
        return
    console = Console()
    console.print(
        f"[bold]dev cluster {st['name']}[/bold]  BERTH_ADDR={st['controller_address']}  "
        f"registry {st['registry_address']}  image {st['image'] or '-'}"
    )
    console.print(
        f"metrics http://{st['metrics_address']}/metrics"
        + (f"  prometheus {st['prometheus_url']}" if st["prometheus_url"] else "")
    )
    procs = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("PROCESS", "PID", "STATE", "ADDRESS", "LOG"):
        procs.add_column(col)
    for p in st["processes"]:
        procs.add_row(
            p["name"],
            str(p["pid"]),
            "[green]up[/green]" if p["alive"] else "[red]down[/red]",
            p["address"] or "-",
            p["log"],
        )
    console.print(procs)
    console.print()
    hosts = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("HOST", "NETNS", "ADDRESS", "CONTAINER SUBNET", "AGENT", "CPUS", "MEMORY", "LABELS"):
        hosts.add_column(col)
    for h in st["hosts"]:
        labels = ",".join(f"{k}={v}" for k, v in h["labels"].items()) or "-"
        hosts.add_row(
            h["name"],
            h["netns"],
            h["address"],
            h["subnet"],
            "[green]up[/green]" if h["agent_alive"] else "[red]down[/red]",
            h["cpus"] or "-",
            h["memory"] or "-",
            labels,
        )
    console.print(hosts)


@app.command("down")
def down(name: NameOpt = "dev", base_dir: BaseDirOpt = DEFAULT_BASE_DIR) -> None:
    """Stop everything and remove every trace of the cluster (safe to repeat)."""
    if os.geteuid() != 0:
        _fail("not root: berth dev needs root to remove network namespaces")
    try:
        cluster = DevCluster(DevClusterConfig(name=name, base_dir=base_dir))
        print(f"removing dev cluster {name!r} ...", file=sys.stderr, flush=True)
        cluster.down()
    except DevClusterError as e:
        _fail(str(e))
        return
    print(f"dev cluster {name!r} removed", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# fault injection: kill / cut / heal / start one host


HostArg = Annotated[str, typer.Argument(help="Host name, e.g. h1 (see `berth dev status`).")]


def _running_cluster(name: str, base_dir: Path, host: str) -> DevCluster:
    """The cluster ``name`` if it is up and has ``host``; a one-line CliError otherwise."""
    if os.geteuid() != 0:
        _fail("not root: berth dev needs root to act on network namespaces and cgroups")
    try:
        cluster = DevCluster(DevClusterConfig(name=name, base_dir=base_dir))
    except DevClusterError as e:
        raise CliError(str(e)) from None
    if not cluster.is_up():
        raise CliError(
            f"dev cluster {name!r} is not up (no {cluster.state_file}); start it with `berth dev up`"
        )
    if host not in cluster.hosts:
        known = ", ".join(sorted(cluster.hosts)) or "none"
        raise CliError(f"no host {host!r} in dev cluster {name!r} (hosts: {known})")
    return cluster


def _cmd(command: str, host: str, name: str, base_dir: Path = DEFAULT_BASE_DIR) -> str:
    """The command line to type next, with the options that differ from the defaults."""
    opts = ("" if name == "dev" else f" --name {name}") + (
        "" if base_dir == DEFAULT_BASE_DIR else f" --base-dir {base_dir}"
    )
    return f"`berth dev {command} {host}{opts}`"


@app.command("kill")
def kill(
    host: HostArg,
    name: NameOpt = "dev",
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    silent: Annotated[
        bool,
        typer.Option(
            "--silent",
            help="Cut the host's link first, so not even the kernel's FIN/RST of the agent's connection "
            "reaches the controller (a real power loss). Undo with `heal` and `start`.",
        ),
    ] = False,
) -> None:
    """Power loss: SIGKILL the host's agent, everything it started and every container (see --silent)."""
    cluster = _running_cluster(name, base_dir, host)
    try:
        if silent:
            cluster.partition(host)
        had_agent = cluster.agent_alive(host)
        killed = cluster.kill_host(host)
    except DevClusterError as e:
        raise CliError(str(e)) from None
    others = len(killed) - (1 if had_agent else 0)
    what = "its agent and" if had_agent else "(its agent was not running)"
    print(f"{host}: powered off: SIGKILL to {what} {others} other process(es) (containers, helpers)")
    if silent:
        heal_cmd, start_cmd = _cmd("heal", host, name, base_dir), _cmd("start", host, name, base_dir)
        print(f"{host}: link is down too; bring it back with {heal_cmd}, then {start_cmd}")
    else:
        print(f"{host}: bring it back with {_cmd('start', host, name, base_dir)}")


@app.command("cut")
def cut(host: HostArg, name: NameOpt = "dev", base_dir: BaseDirOpt = DEFAULT_BASE_DIR) -> None:
    """Partition: take the host's link down (no packet in or out); its agent and containers keep running."""
    cluster = _running_cluster(name, base_dir, host)
    try:
        was_cut = cluster.partitioned(host)
        cluster.partition(host)
    except DevClusterError as e:
        raise CliError(str(e)) from None
    h = cluster.host(host)
    if was_cut:
        print(f"{host}: already cut off (link {h.veth} is down)")
        return
    heal_cmd = _cmd("heal", host, name, base_dir)
    print(f"{host}: cut off ({h.address} unreachable, link {h.veth} down); undo with {heal_cmd}")


@app.command("heal")
def heal(host: HostArg, name: NameOpt = "dev", base_dir: BaseDirOpt = DEFAULT_BASE_DIR) -> None:
    """Undo `cut`: bring the host's link back up."""
    cluster = _running_cluster(name, base_dir, host)
    try:
        was_cut = cluster.partitioned(host)
        cluster.heal(host)
        agent_alive = cluster.agent_alive(host)
    except DevClusterError as e:
        raise CliError(str(e)) from None
    h = cluster.host(host)
    print(f"{host}: link {h.veth} up, {h.address} reachable" if was_cut else f"{host}: was not cut off")
    if not agent_alive:
        print(f"{host}: its agent is not running; start it with {_cmd('start', host, name, base_dir)}")


@app.command("start")
def start(host: HostArg, name: NameOpt = "dev", base_dir: BaseDirOpt = DEFAULT_BASE_DIR) -> None:
    """(Re)start a host's agent after `kill`: it re-adopts or cleans up what the host ran before."""
    cluster = _running_cluster(name, base_dir, host)
    if cluster.agent_alive(host):
        raise CliError(f"the agent of {host} is already running")
    try:
        cluster.start_agent(host)
        cut_off = cluster.partitioned(host)
    except DevClusterError as e:
        raise CliError(str(e).splitlines()[0].rstrip(":").replace("last lines of", "see")) from None
    procs = cluster.status()["processes"]
    pid = next((p["pid"] for p in procs if p["name"] == f"agent-{host}"), "?")
    print(f"{host}: agent started (pid {pid})")
    if cut_off:
        heal_cmd = _cmd("heal", host, name, base_dir)
        print(f"{host}: its link is down; it reaches the controller after {heal_cmd}")
