"""``berth plan``: what applying a spec would do, changing nothing.

Against the live cluster it asks the controller (ClusterAPI ``Plan``). With ``--cluster
nodes.yaml`` it plans offline against hypothetical nodes — a capacity-planning what-if — by
running the controller's planner as a subprocess (``python -m berth.controller.offline_plan``), so
the CLI never imports the controller and both paths run the same planning code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
import yaml
from google.protobuf import json_format

from berth.cli.client import Client
from berth.cli.errors import CliError, InputError
from berth.cli.render import OutputFormat, resolve
from berth.cli.spec import load_file, quantity
from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

NODE_FIELDS = ("name", "cpus", "memory", "labels", "resources", "count")


def load_cluster(path: Path) -> list[pb.Node]:
    """Hypothetical nodes: ``nodes: [{name, cpus, memory, labels, resources, count}]``."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"--cluster: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--cluster: {path} is malformed YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("nodes") if isinstance(data, Mapping) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(
            f"--cluster: {path} needs a list of nodes, e.g. nodes: [{{name: a, cpus: 8, memory: 32Gi}}]"
        )
    nodes: list[pb.Node] = []
    for i, entry in enumerate(entries):
        field = f"nodes[{i}]"
        if not isinstance(entry, Mapping):
            raise InputError(f"{field}: must be a mapping with name, cpus, memory")
        unknown = set(entry) - set(NODE_FIELDS)
        if unknown:
            raise InputError(
                f"{field}: unknown field {sorted(unknown)[0]!r}; known: {', '.join(NODE_FIELDS)}"
            )
        if "name" not in entry:
            raise InputError(f"{field}.name: required")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"{field}.count: must be a whole number >= 1, got {count!r}")
        capacity = pb.Resources(
            cpu_millis=quantity(f"{field}.cpus", entry.get("cpus", 0), parse_cpu),
            memory_bytes=quantity(f"{field}.memory", entry.get("memory", 0), parse_memory),
        )
        for name, amount in (entry.get("resources") or {}).items():
            if name in ("cpu", "memory"):
                raise InputError(
                    f"{field}.resources.{name}: not a named resource; give it as {field}.{name}"
                    f"{'s' if name == 'cpu' else ''}"
                )
            capacity.scalars[str(name)] = quantity(f"{field}.resources.{name}", amount, parse_memory)
        labels = {str(k): str(v) for k, v in (entry.get("labels") or {}).items()}
        for n in range(1, count + 1):
            name = str(entry["name"]) if count == 1 else f"{entry['name']}-{n}"
            nodes.append(pb.Node(id=name, name=name, capacity=capacity, labels=labels))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InputError(
            f"--cluster: node names repeat: {sorted({x for x in names if names.count(x) > 1})[0]}"
        )
    return nodes


def plan_offline(request: cluster_pb2.PlanRequest, nodes: list[pb.Node]) -> cluster_pb2.PlanResponse:
    document = {
        "request": json_format.MessageToDict(request),
        "nodes": [json_format.MessageToDict(n) for n in nodes],
    }
    proc = subprocess.run(
        [sys.executable, "-m", "berth.controller.offline_plan"],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CliError(f"the offline planner failed: {proc.stderr.strip().splitlines()[-1:]}") from None
    if "error" in answer:
        raise InputError(str(answer["error"]))
    return json_format.ParseDict(answer, cluster_pb2.PlanResponse())


def as_dict(response: cluster_pb2.PlanResponse, node_count: int | None) -> dict[str, Any]:
    placements = [
        {"service": p.service, "slot": p.slot, "node": p.node, "node_id": p.node_id, "existing": p.existing}
        for p in response.placements
    ]
    return {
        "placements": placements,
        "pending": [
            {"service": w.service, "slot": w.slot, "reasons": [w.reason], "rejections": dict(w.rejections)}
            for w in response.pending
        ],
        "verdicts": [
            {
                "service": v.service,
                "slot": v.slot,
                "node": v.node,
                "feasible": v.feasible,
                "reason": v.reason,
                "score": round(v.score, 6),
            }
            for v in response.verdicts
        ],
        "removed": list(response.removed),
        "nodes_used": len({p["node"] for p in placements}),
        "nodes_total": node_count,
    }


def render(result: dict[str, Any]) -> None:
    per_node = Counter(p["node"] for p in result["placements"])
    new = sum(1 for p in result["placements"] if not p["existing"])
    print(
        f"placements: {len(result['placements'])} ({new} new), pending: {len(result['pending'])}, "
        f"stopped: {len(result['removed'])}"
    )
    total = f" of {result['nodes_total']}" if result["nodes_total"] else ""
    print(f"nodes used: {result['nodes_used']}{total}")
    for node, count in sorted(per_node.items()):
        print(f"  {node:<24} {count} task(s)")
    if result["pending"]:
        print("pending:")
        for w in result["pending"]:
            print(f"  {w['service']}.{w['slot']:<6} {w['reasons'][0]}")
    if result["verdicts"]:
        print("per-node verdicts for the first new task of each service:")
        for v in result["verdicts"]:
            verdict = f"score {v['score']:.3f}" if v["feasible"] else f"no: {v['reason']}"
            print(f"  {v['service']}.{v['slot']} on {v['node']:<20} {verdict}")


def plan(
    file: Path = typer.Option(
        ..., "--file", "-f", help="YAML spec file to plan (several documents allowed)."
    ),
    cluster: Path | None = typer.Option(
        None,
        "--cluster",
        help="Plan offline against these hypothetical nodes (YAML) instead of the live cluster.",
    ),
    output: OutputFormat = typer.Option(OutputFormat.auto, "--output", "-o", help="table, json or auto."),
) -> None:
    """Show what `berth service apply -f FILE` would do, changing nothing.

    Placements, pending reasons, and per-node verdicts and scores. With --cluster nodes.yaml it
    plans offline against hypothetical nodes: how many hosts would this need?"""
    request = cluster_pb2.PlanRequest(specs=load_file(file))
    if cluster is not None:
        nodes = load_cluster(cluster)
        response = plan_offline(request, nodes)
        count: int | None = len(nodes)
    else:
        client = Client()
        response = client.call(client.stub.Plan, request)
        count = None
    result = as_dict(response, count)
    if resolve(output) is OutputFormat.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
