"""Flatten API messages into the rows that tables and ``--output json`` show."""

from __future__ import annotations

from typing import Any

from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import format_cpu, format_memory


def state_name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", "-")


def task_row(view: cluster_pb2.TaskView) -> dict[str, Any]:
    task, status = view.task, view.status
    observed = view.HasField("status") and status.node_id == task.node_id and bool(task.node_id)
    if not task.node_id:
        state, reason = "pending", task.pending_reason
    elif observed:
        state = state_name(status.state, pb.TaskState, "TASK_STATE_")
        reason = status.error or status.message
    else:
        state, reason = "assigned", "waiting for the agent"
    ports = [
        f"{view.node_address}:{p.host_port}->{p.container_port}/{p.protocol or 'tcp'}" for p in task.ports
    ]
    address = ""
    if task.node_id and task.ports:
        address = f"{view.node_address}:{task.ports[0].host_port}"
    return {
        "id": task.id,
        "service": task.service,
        "slot": task.slot,
        "node": view.node_name,
        "node_id": task.node_id,
        "state": state,
        "desired_state": state_name(task.desired_state, pb.TaskState, "TASK_STATE_"),
        "reason": reason,
        "address": address,
        "ports": ports,
        "container_ip": status.container_ip if observed else "",
        "pid": status.pid if observed else 0,
        "restarts": status.restarts if observed else 0,
    }


def service_row(view: cluster_pb2.ServiceView) -> dict[str, Any]:
    spec = view.service.spec
    return {
        "name": spec.name,
        "image": spec.image,
        "replicas": f"{view.running}/{spec.replicas}",
        "desired": spec.replicas,
        "running": view.running,
        "pending": view.pending,
        "cpu": format_cpu(spec.resources.cpu_millis) if spec.resources.cpu_millis else "",
        "memory": format_memory(spec.resources.memory_bytes) if spec.resources.memory_bytes else "",
        "ports": [f"{p.host_port or '*'}:{p.container_port}/{p.protocol or 'tcp'}" for p in spec.ports],
        "generation": view.service.generation,
    }


def _resources(r: pb.Resources) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_millis": r.cpu_millis, "memory_bytes": r.memory_bytes}
    out.update(dict(r.scalars))
    return out


def node_row(view: cluster_pb2.NodeView) -> dict[str, Any]:
    node, alloc = view.node, view.allocated
    return {
        "id": node.id,
        "name": node.name,
        "address": node.address,
        "state": state_name(node.state, pb.NodeState, "NODE_STATE_"),
        "availability": state_name(
            node.availability or pb.NODE_AVAILABILITY_ACTIVE, pb.NodeAvailability, "NODE_AVAILABILITY_"
        ),
        "capacity": _resources(node.capacity),
        "allocated": _resources(alloc),
        "tasks": view.tasks,
        "labels": dict(node.labels),
        "cpu": f"{format_cpu(alloc.cpu_millis)}/{format_cpu(node.capacity.cpu_millis)}",
        "memory": f"{format_memory(alloc.memory_bytes)}/{format_memory(node.capacity.memory_bytes)}",
    }
