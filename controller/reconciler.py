"""Keep every service at its replica count: pure computation over desired and observed state.

``reconcile`` compares services with their task slots and returns what to create, replace and
remove; it takes the clock and the id generator as arguments so it stays deterministic under
test. The controller's loop (``berth.controller.cluster``) commits the result and hands the
pending tasks to the scheduler.

Rules, as in Swarm's replicated orchestrator:
- slots ``1..replicas`` each hold exactly one task; a missing slot gets a new pending task;
- a task whose spec generation is older than its service's is replaced by a new pending task in
  the same slot (the old container is stopped; rolling updates are a later feature); for an
  at-most-one service (``on_disconnect: stop``) whose old task is placed on a node, the scheduling
  step does it instead, stop first (:func:`plan_replacements`);
- slots above ``replicas`` and tasks of removed services are deleted;
- a task placed on a node that no longer exists goes back to pending.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from berth.controller.placement import constraints_of
from berth.controller.scheduler import Constraint
from berth.proto.berth.v1 import types_pb2 as pb


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileResult:
    put: tuple[tuple[str, pb.Task], ...]  # (task key, new value): new, replacing or reset tasks
    delete: tuple[str, ...]  # task keys

    @property
    def empty(self) -> bool:
        return not self.put and not self.delete


def new_task(service: pb.Service, slot: int, *, task_id: str, now: float) -> pb.Task:
    return pb.Task(
        id=task_id,
        service=service.spec.name,
        slot=slot,
        spec_generation=service.generation,
        spec=service.spec,
        desired_state=pb.TASK_STATE_RUNNING,
        created_at=now,
        pending_reason="waiting for the scheduler",
    )


def reconcile(
    *,
    services: Mapping[str, pb.Service],
    tasks: Mapping[str, pb.Task],
    node_ids: set[str],
    task_key: Callable[[str, int], str],
    new_id: Callable[[str, int], str],
    now: float,
) -> ReconcileResult:
    """Compute the task writes that bring slots in line with the declared services."""
    put: list[tuple[str, pb.Task]] = []
    delete: list[str] = []
    wanted: set[str] = set()
    for name, service in services.items():
        template: pb.Task | None = None  # a service's new tasks differ only in id and slot
        for slot in range(1, service.spec.replicas + 1):
            key = task_key(name, slot)
            wanted.add(key)
            current = tasks.get(key)
            if (
                current is not None
                and current.spec_generation != service.generation
                and current.node_id in node_ids
                and service.spec.on_disconnect == pb.ON_DISCONNECT_STOP
            ):
                continue  # stop first: plan_replacements moves it once the old copy has stopped
            if current is None or current.spec_generation != service.generation:
                if template is None:
                    template = new_task(service, 0, task_id="", now=now)
                task = pb.Task()
                task.CopyFrom(template)
                task.id = new_id(name, slot)
                task.slot = slot
                put.append((key, task))
            elif current.node_id and current.node_id not in node_ids:
                reset = pb.Task()
                reset.CopyFrom(current)
                reset.node_id = ""
                del reset.ports[:]
                reset.pending_reason = "its node was removed"
                put.append((key, reset))
    for key in tasks:
        if key not in wanted:
            delete.append(key)
    return ReconcileResult(put=tuple(put), delete=tuple(sorted(delete)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Replacement:
    """A slot whose task must move: ``retire`` keeps the old task running until the new one runs
    (drain); ``stop_first`` stops the old task and starts the new one only once the old one's
    agent has reported it stopped (at-most-one services), once a node is known to take the new
    one (drain, relabel) or ``regardless`` (an update: the old spec must go); otherwise the old
    task is dropped once the new one is placed (node down)."""

    key: str
    old: pb.Task
    retire: bool
    reason: str
    stop_first: bool = False
    regardless: bool = False


def plan_replacements(
    *,
    tasks: Mapping[str, pb.Task],
    nodes: Mapping[str, pb.Node],
    services: Mapping[str, pb.Service],
    silent_for: Callable[[str], float],
    deadline: float,
    margin: float,
) -> list[Replacement]:
    """Which placed tasks need a replacement now.

    - on a DOWN node: yes, except at-most-one services (``on_disconnect: stop``) until the node
      has been silent for deadline + margin, so their agent has stopped them first;
    - on a DRAINING node that is up: yes, replacement first (the old task retires);
    - on a node that no longer meets the task's constraints (its labels changed when its agent
      registered again): the same as draining, as Swarm does (Kubernetes' required node affinity
      would leave it running);
    - at-most-one services (``on_disconnect: stop``) on a node that is up move *stop first*
      instead (two copies must never run at once): when draining or when their node no longer
      meets their constraints, once the plan finds a node for the new task (until then the old
      one keeps running); when their service was updated (a task of an older generation), at
      once, ``regardless`` of room: the old spec must go, as with Swarm's stop-first updates.
    """
    out: list[Replacement] = []
    constraints: dict[tuple[str, int], tuple[Constraint, ...]] = {}  # per service generation
    for key, task in tasks.items():
        node = nodes.get(task.node_id)
        if node is None or task.service not in services:
            continue
        if node.state == pb.NODE_STATE_DOWN:
            spec = services[task.service].spec
            if spec.on_disconnect == pb.ON_DISCONNECT_STOP and silent_for(node.id) < deadline + margin:
                continue
            out.append(Replacement(key=key, old=task, retire=False, reason=f"node {node.name} down"))
        else:
            service = services[task.service]
            at_most_one = service.spec.on_disconnect == pb.ON_DISCONNECT_STOP
            if at_most_one and task.spec_generation != service.generation:
                reason = f"service updated to generation {service.generation}"
                out.append(
                    Replacement(
                        key=key, old=task, retire=False, reason=reason, stop_first=True, regardless=True
                    )
                )
                continue
            reason = ""
            if node.availability == pb.NODE_AVAILABILITY_DRAIN:
                reason = f"node {node.name} draining"
            else:
                generation = (task.service, task.spec_generation)
                wanted = constraints.get(generation)
                if wanted is None:
                    wanted = constraints[generation] = constraints_of(task.spec)
                broken = next((c for c in wanted if not c.holds(node.labels)), None) if wanted else None
                if broken is not None:
                    reason = f"node {node.name} no longer meets constraint {broken}"
            if reason:
                out.append(
                    Replacement(
                        key=key, old=task, retire=not at_most_one, reason=reason, stop_first=at_most_one
                    )
                )
    return sorted(out, key=lambda r: (r.old.service, r.old.slot))
