"""``berth dev``: a multi-host Berth cluster on this machine (network namespaces as hosts).

``berth dev up`` starts etcd, a registry (with the example portal image pushed) and a controller in the
root namespace and one agent per host namespace; ``berth dev status`` shows them; ``berth dev down``
removes every trace. Needs root. See ``berth.cli.devcluster`` for the address plan.
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
from berth.cli.devcluster import (
    DEFAULT_BASE_DIR,
    DevCluster,
    DevClusterConfig,
    DevClusterError,
    PreflightError,
)
from berth.cli.errors import CliError
from berth.cli.render import OutputFormat, resolve
from rich.console import Console
from rich.table import Table

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
