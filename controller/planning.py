"""One scheduling step, shared by the live controller and ``berth plan`` (live or offline).

``scheduling_step`` turns plain values (services, tasks, nodes) into the scheduler's input —
pending tasks plus replacements for tasks on down or draining nodes — and runs the pure
scheduler. ``Cluster`` commits its result; ``preview`` only reports it, after applying the given
specs to a copy of the state the same way the reconciler would. Same inputs, same code, same plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from berth.controller import placement
from berth.controller.reconciler import Replacement, new_task, plan_replacements, reconcile
from berth.controller.scheduler import NodeInfo, Plan, explain, schedule
from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    services: Mapping[str, pb.Service]
    tasks: Mapping[str, pb.Task]  # by task key
    nodes: Mapping[str, pb.Node]  # by node id
    retiring: Sequence[pb.Task] = ()

    def by_node(self) -> dict[str, list[pb.Task]]:
        out: dict[str, list[pb.Task]] = defaultdict(list)
        for task in self.tasks.values():
            if task.node_id:
                out[task.node_id].append(task)
        for task in self.retiring:
            out[task.node_id].append(task)
        return out


@dataclass(slots=True, kw_only=True)
class Step:
    pending: dict[str, tuple[str, pb.Task]] = field(default_factory=dict)  # task id -> (key, task)
    replacements: dict[str, tuple[Replacement, pb.Task]] = field(default_factory=dict)  # new id -> ...
    # stop-first moves made whatever the plan (updates of at-most-one services): new id -> ...
    stops: dict[str, tuple[Replacement, pb.Task]] = field(default_factory=dict)
    # slots whose task waits for its old one to stop (``held_slots``): (service, slot) -> old id
    held: dict[tuple[str, int], str] = field(default_factory=dict)
    nodes: list[NodeInfo] = field(default_factory=list)
    plan: Plan | None = None

    def work(self) -> Work:
        """What this step is asked to place: its fingerprint for ``worth_planning``."""
        replaced = frozenset(r.old.id for r, _ in self.replacements.values())
        return Work(pending=frozenset(self.pending), replaced=replaced)


@dataclass(frozen=True, slots=True)
class Work:
    pending: frozenset[str]  # ids of the unplaced tasks
    replaced: frozenset[str]  # ids of the tasks to move (down, draining or relabelled nodes)


def scheduling_step(
    snap: Snapshot,
    *,
    silent_for: Callable[[str], float],
    deadline: float,
    margin: float,
    now: float,
    new_id: Callable[[str, int], str],
    worth_planning: Callable[[Work], bool] | None = None,
) -> Step:
    """``worth_planning``, given what there is to place, may say it is not worth planning (the
    caller knows nothing changed since the same work last placed nothing): the step then stops
    before the costly part, with ``plan`` None."""
    step = Step(held=held_slots(snap.retiring))
    held = step.held
    unplaced = [
        (key, t)
        for key, t in snap.tasks.items()
        if not t.node_id and t.desired_state == pb.TASK_STATE_RUNNING and (t.service, t.slot) not in held
    ]
    unplaced.sort(key=lambda kv: (kv[1].service, kv[1].slot))
    step.pending = {t.id: (key, t) for key, t in unplaced}
    for r in plan_replacements(
        tasks=snap.tasks,
        nodes=snap.nodes,
        services=snap.services,
        silent_for=silent_for,
        deadline=deadline,
        margin=margin,
    ):
        service = snap.services[r.old.service]
        task_id = new_id(r.old.service, r.old.slot)
        if r.old.spec_generation == service.generation:
            fresh = placement.replacement_for(r.old, task_id, now)
        else:  # an update moved stop first: the successor runs the service's current spec
            fresh = new_task(service, r.old.slot, task_id=task_id, now=now)
            fresh.pending_reason = ""
        (step.stops if r.regardless else step.replacements)[fresh.id] = (r, fresh)
    if not step.pending and not step.replacements:
        return step
    if worth_planning is not None and not worth_planning(step.work()):
        return step
    by_node = snap.by_node()
    step.nodes = [placement.node_info(node, by_node.get(nid, [])) for nid, node in sorted(snap.nodes.items())]
    requests = placement.task_requests(
        [t for _, t in step.pending.values()] + [fresh for _, fresh in step.replacements.values()]
    )
    step.plan = schedule(step.nodes, requests)
    return step


def held_slots(retiring: Iterable[pb.Task]) -> dict[tuple[str, int], str]:
    """Slots whose new task waits for the old one to stop (a stop-first move of an at-most-one
    service), with the old task's id: the old task retires with desired state SHUTDOWN, and until
    its agent reports it stopped the slot's task is not placed."""
    return {(t.service, t.slot): t.id for t in retiring if t.desired_state == pb.TASK_STATE_SHUTDOWN}


def held_reason(old_id: str) -> str:
    return f"waiting for {old_id} to stop first"


def apply_specs(
    services: Mapping[str, pb.Service], specs: Iterable[pb.ServiceSpec], now: float
) -> dict[str, pb.Service]:
    """The services as they would be after applying ``specs`` (same generation rule as the API)."""
    out = dict(services)
    for spec in specs:
        old = out.get(spec.name)
        generation = 1
        if old is not None:
            generation = old.generation + (1 if needs_new_tasks(old.spec, spec) else 0)
        out[spec.name] = pb.Service(spec=spec, generation=generation, created_at=now, updated_at=now)
    return out


def needs_new_tasks(old: pb.ServiceSpec, new: pb.ServiceSpec) -> bool:
    """Whether a spec change must replace running tasks: anything but the replica count."""
    a, b = pb.ServiceSpec(), pb.ServiceSpec()
    a.CopyFrom(old)
    b.CopyFrom(new)
    a.replicas = b.replicas = 0
    return a != b


def preview(
    snap: Snapshot,
    specs: Sequence[pb.ServiceSpec],
    *,
    now: float,
    task_key: Callable[[str, int], str],
    silent_for: Callable[[str], float] = lambda _: 0.0,
    deadline: float = 4.0,
    margin: float = 2.0,
) -> cluster_pb2.PlanResponse:
    """What applying ``specs`` would do to this snapshot: placements, pending reasons, per-node
    verdicts for the first task of each service, and the tasks it would stop."""
    services = apply_specs(snap.services, specs, now)
    result = reconcile(
        services=services,
        tasks=snap.tasks,
        node_ids=set(snap.nodes),
        task_key=task_key,
        new_id=lambda service, slot: f"{service}.{slot}.planned",
        now=now,
    )
    tasks = dict(snap.tasks)
    removed = []
    for key in result.delete:
        removed.append(tasks.pop(key).id)
    for key, task in result.put:
        old = tasks.get(key)
        if old is not None and old.id != task.id and old.node_id:
            removed.append(old.id)  # (a task that was not placed stops nothing)
        tasks[key] = task
    after = Snapshot(services=services, tasks=tasks, nodes=snap.nodes, retiring=snap.retiring)
    step = scheduling_step(
        after,
        silent_for=silent_for,
        deadline=deadline,
        margin=margin,
        now=now,
        new_id=lambda service, slot: f"{service}.{slot}.planned-replacement",
    )
    names = {nid: n.name for nid, n in snap.nodes.items()}
    wanted = {spec.name for spec in specs}
    response = cluster_pb2.PlanResponse()
    placed_now: dict[str, str] = {}  # task id -> node, for pending tasks placed now
    moved: dict[str, str] = {}  # task key -> node, for slots whose replacement is placed now
    stopping: set[str] = set()  # task keys of slots moving stop first: their new task waits
    if step.plan is not None:
        for p in step.plan.placements:
            if p.task_id in step.replacements:
                replaced = step.replacements[p.task_id][0]
                if replaced.stop_first:  # the old task stops now, the new one is placed after
                    stopping.add(replaced.key)
                    if replaced.old.service in wanted:
                        removed.append(replaced.old.id)
                        response.pending.add(
                            service=replaced.old.service,
                            slot=replaced.old.slot,
                            reason=held_reason(replaced.old.id),
                        )
                    continue
                moved[replaced.key] = p.node_id
                if replaced.old.service in wanted:
                    removed.append(replaced.old.id)  # stopped once its replacement runs
            else:
                placed_now[p.task_id] = p.node_id
        for w in step.plan.pending:
            task = (
                step.pending[w.task_id][1] if w.task_id in step.pending else step.replacements[w.task_id][1]
            )
            if task.service in wanted:
                response.pending.add(
                    service=task.service, slot=task.slot, reason=w.reason, rejections=dict(w.rejections)
                )
    for task in sorted(tasks.values(), key=lambda t: (t.service, t.slot)):
        old_id = step.held.get((task.service, task.slot))
        if task.service in wanted and not task.node_id and old_id is not None:
            # its predecessor is stopping (a stop-first move): it is placed once that is done
            response.pending.add(service=task.service, slot=task.slot, reason=held_reason(old_id))
    for r, _ in step.stops.values():  # an at-most-one update: stopped now, replaced after
        stopping.add(r.key)
        if r.old.service in wanted:
            removed.append(r.old.id)
            response.pending.add(service=r.old.service, slot=r.old.slot, reason=held_reason(r.old.id))
    response.removed.extend(sorted(removed))
    for key, task in sorted(tasks.items(), key=lambda kv: (kv[1].service, kv[1].slot)):
        if task.service not in wanted or key in stopping:
            continue
        if task.id in placed_now or key in moved:
            node_id = placed_now.get(task.id) or moved[key]
            response.placements.add(
                service=task.service, slot=task.slot, node_id=node_id, node=names.get(node_id, "")
            )
        elif task.node_id:
            # includes a slot whose replacement cannot be placed: it stays where it is (kept
            # running when its node drains, shown lost when it is down) and the replacement is
            # listed as pending with its reason, as applying would do
            response.placements.add(
                service=task.service,
                slot=task.slot,
                node_id=task.node_id,
                node=names.get(task.node_id, ""),
                existing=True,
            )
    first_requests = {}
    for _, task in step.pending.values():
        if task.service in wanted and task.service not in first_requests:
            first_requests[task.service] = task
    by_node = after.by_node()
    nodes = [placement.node_info(node, by_node.get(nid, [])) for nid, node in sorted(snap.nodes.items())]
    for service, task in sorted(first_requests.items()):
        for verdict in explain(nodes, placement.task_request(task)):
            response.verdicts.add(
                service=service,
                slot=task.slot,
                node=names.get(verdict.node_id, verdict.node_id),
                feasible=verdict.feasible,
                reason=verdict.reason,
                score=verdict.score,
            )
    return response
