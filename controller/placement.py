"""Translate between the stored state and the pure scheduler's model, both ways.

The scheduler sees only frozen dataclasses; this module is the codec at that edge: it builds the
node snapshot (capacity, what placed tasks already hold, taken host ports, replicas per service)
and turns a ``Plan`` back into task updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from berth.controller.scheduler import (
    Availability,
    Constraint,
    NodeInfo,
    Placement,
    PortRequest,
    Resources,
    Strategy,
    TaskRequest,
)
from berth.proto.berth.v1 import types_pb2 as pb

_AVAILABILITY = {
    pb.NODE_AVAILABILITY_UNSPECIFIED: Availability.ACTIVE,
    pb.NODE_AVAILABILITY_ACTIVE: Availability.ACTIVE,
    pb.NODE_AVAILABILITY_PAUSE: Availability.PAUSE,
    pb.NODE_AVAILABILITY_DRAIN: Availability.DRAIN,
}


def resources_of(r: pb.Resources) -> Resources:
    return Resources(cpu_millis=r.cpu_millis, memory_bytes=r.memory_bytes, scalars=dict(r.scalars))


def to_pb_resources(r: Resources) -> pb.Resources:
    return pb.Resources(cpu_millis=r.cpu_millis, memory_bytes=r.memory_bytes, scalars=dict(r.scalars))


def allocated_by(tasks: Iterable[pb.Task]) -> Resources:
    cpu = mem = 0
    scalars: dict[str, int] = {}
    for t in tasks:
        req = t.spec.resources
        cpu += req.cpu_millis
        mem += req.memory_bytes
        for name, value in req.scalars.items():
            scalars[name] = scalars.get(name, 0) + value
    return Resources(cpu_millis=cpu, memory_bytes=mem, scalars=scalars)


def node_info(node: pb.Node, placed: Sequence[pb.Task]) -> NodeInfo:
    counts: dict[str, int] = {}
    ports: set[tuple[str, int]] = set()
    for t in placed:
        counts[t.service] = counts.get(t.service, 0) + 1
        for p in t.ports:
            ports.add((p.protocol or "tcp", p.host_port))
    return NodeInfo(
        id=node.id,
        name=node.name,
        capacity=resources_of(node.capacity),
        allocated=allocated_by(placed),
        labels=dict(node.labels),
        ready=node.state == pb.NODE_STATE_READY,
        availability=_AVAILABILITY[node.availability],
        used_ports=frozenset(ports),
        service_counts=counts,
    )


def task_request(task: pb.Task) -> TaskRequest:
    spec = task.spec
    host_net = spec.network == pb.NETWORK_MODE_HOST
    return TaskRequest(
        task_id=task.id,
        service=task.service,
        slot=task.slot,
        resources=resources_of(spec.resources),
        ports=tuple(
            PortRequest(
                container_port=p.container_port,
                # with host networking the container binds the host port itself
                host_port=(p.host_port or p.container_port) if host_net else p.host_port,
                protocol=p.protocol or "tcp",
            )
            for p in spec.ports
        ),
        constraints=constraints_of(spec),
        max_per_node=spec.max_per_node,
        spread=tuple(spec.spread),
        strategy=Strategy.SPREAD if spec.strategy == pb.STRATEGY_SPREAD else Strategy.BINPACK,
    )


def constraints_of(spec: pb.ServiceSpec) -> tuple[Constraint, ...]:
    """A spec's placement constraints as the scheduler evaluates them."""
    return tuple(
        Constraint(key=c.key, op=c.op, value=c.value, values=tuple(c.values)) for c in spec.constraints
    )


def task_requests(tasks: Sequence[pb.Task]) -> list[TaskRequest]:
    """``task_request`` for many tasks: the replicas of one service generation run the same spec
    (any change but the count bumps the generation), so its conversion is done once per
    generation and only the id and slot differ."""
    templates: dict[tuple[str, int], TaskRequest] = {}
    out = []
    for task in tasks:
        template = templates.get((task.service, task.spec_generation))
        if template is None:
            template = templates[(task.service, task.spec_generation)] = task_request(task)
            out.append(template)
        else:
            out.append(  # the constructor, not dataclasses.replace: half the cost per task
                TaskRequest(
                    task_id=task.id,
                    service=template.service,
                    slot=task.slot,
                    resources=template.resources,
                    ports=template.ports,
                    constraints=template.constraints,
                    max_per_node=template.max_per_node,
                    spread=template.spread,
                    strategy=template.strategy,
                )
            )
    return out


def placed(task: pb.Task, placement: Placement, now: float, *, in_place: bool = False) -> pb.Task:
    """The task bound to the plan's node, with the host ports the scheduler allocated.
    ``in_place`` binds ``task`` itself: for a task made in this pass, that nothing else holds."""
    if in_place:
        out = task
    else:
        out = pb.Task()
        out.CopyFrom(task)
    out.node_id = placement.node_id
    out.pending_reason = ""
    out.assigned_at = now
    if out.ports:
        del out.ports[:]
    for container_port, host_port, protocol in placement.ports:
        out.ports.add(container_port=container_port, host_port=host_port, protocol=protocol)
    return out


def with_reason(task: pb.Task, reason: str) -> pb.Task:
    out = pb.Task()
    out.CopyFrom(task)
    out.pending_reason = reason
    return out


def replacement_for(old: pb.Task, task_id: str, now: float) -> pb.Task:
    """A fresh, unplaced copy of a task (same slot, same spec) under a new id."""
    out = pb.Task()
    out.CopyFrom(old)
    out.id = task_id
    out.node_id = ""
    del out.ports[:]
    out.created_at = now
    out.assigned_at = 0
    out.pending_reason = ""
    return out
