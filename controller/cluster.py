"""The controller's core: the one writer of desired state, the reconcile loop and node liveness.

Every change (API calls, agent registrations and reports, the loop's reconcile and placement
decisions, nodes declared down) goes through ``Cluster._commit`` under one lock: ops are guarded
by the revisions in the cache, committed to etcd in batches, folded into the cache only after
etcd accepted them (so a failed call changes it by what etcd did commit, and nothing else), and
then the affected agents are told what changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import operator
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from berth.controller import placement
from berth.controller.agents import AgentHub, Session
from berth.controller.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from berth.controller.events import EventBus
from berth.controller.metrics import PENDING_REASONS, ControllerMetrics, StateView, reason_code
from berth.controller.nodes import AT_MOST_ONE_MARGIN, Liveness
from berth.controller.planning import (
    Snapshot,
    Work,
    held_reason,
    needs_new_tasks,
    preview,
    scheduling_step,
)
from berth.controller.reconciler import Replacement, reconcile
from berth.controller.state import ClusterState
from berth.controller.store import ConflictError, Op, Put, Store, StoreError
from berth.controller.validation import SpecError, validate_spec
from berth.proto.berth.v1 import agent_pb2, cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 5.0  # the loop also runs this often without a trigger (pending tasks, new nodes)
LIVENESS_TICK = 0.25
STATUS_FLUSH_DELAY = 0.02
COALESCE_DELAY = 0.02
COALESCE_MAX = 0.5
STALL_LIMIT = 1.0  # a liveness tick this late means the controller itself was not running
FOLD_CHUNK = 64  # transactions folded between two yields to the event loop (see _catch_up)
SUSPECT_INTERVALS = 2.0  # a node silent this many heartbeat intervals no longer vouches for its tasks

_STATE_EVENTS = {
    pb.TASK_STATE_RUNNING: "task-started",
    pb.TASK_STATE_FAILED: "task-failed",
    pb.TASK_STATE_REJECTED: "task-rejected",
    pb.TASK_STATE_COMPLETE: "task-complete",
    pb.TASK_STATE_SHUTDOWN: "task-stopped",
}


def _new_task_id(service: str, slot: int) -> str:
    return f"{service}.{slot}.{secrets.token_hex(4)}"


_node_id = operator.attrgetter("node_id")


def _at_most_one(task: pb.Task) -> bool:
    return task.spec.on_disconnect == pb.ON_DISCONNECT_STOP


def _told_to_stop(task: pb.Task) -> pb.Task:
    """The task as it retires stop first: desired state SHUTDOWN, and marked at-most-one (its
    service may just have become so in the update that stops it), so that the agent's watchdog
    stops it when cut off, as the controller's deadline-and-margin rule for it assumes."""
    out = pb.Task()
    out.CopyFrom(task)
    out.desired_state = pb.TASK_STATE_SHUTDOWN
    out.spec.on_disconnect = pb.ON_DISCONNECT_STOP
    return out


def _service_slot(task: pb.Task) -> tuple[str, int]:
    return task.service, task.slot


def _copy_node(node: pb.Node) -> pb.Node:
    out = pb.Node()
    out.CopyFrom(node)
    return out


class Cluster:
    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        liveness: Liveness | None = None,
        margin: float = AT_MOST_ONE_MARGIN,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.clock = clock
        self.liveness = liveness or Liveness()
        self.margin = margin
        self.hub = AgentHub()
        self.events = EventBus(clock)
        self.state = ClusterState(keys=self.keys)
        self._lock = asyncio.Lock()
        self._uncertain = False  # a write's outcome is unknown: the next writer reloads first
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._awaiting_margin: set[str] = set()
        self._status_inbox: dict[str, pb.TaskStatus] = {}
        self._status_wake = asyncio.Event()  # down nodes whose at-most-one tasks wait for the margin
        self.metrics = metrics or ControllerMetrics()
        # node id -> (monotonic time it was declared down, {task key: id of the task it held there})
        self._failovers: dict[str, tuple[float, dict[str, str]]] = {}
        # every ready node was heard at or after this moment (None: unknown, scan them all); at
        # 5,000 nodes a scan four times a second was 3 % of the controller's interpreter
        self._ready_heard_since: float | None = None
        self._kept: dict[str, str] = {}  # task id -> why it stays on a node it should leave
        # bumped by every committed write a plan depends on (all but statuses): with the same
        # version and the same work, the scheduler gives the same answer
        self._plan_inputs = 0
        self._fruitless: tuple[int, Work] | None = None  # the last plan that placed nothing
        self._planner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-plan")

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loaded = await self.store.load()
        self.state = ClusterState.from_loaded(self.keys, loaded)
        self.liveness.fresh(self.state.nodes)  # judge no node before it had a chance to reconnect
        self.liveness.scale_to(len(self.state.nodes))
        # nodes already down: their at-most-one tasks are replaced once the margin has passed
        # from now, and the liveness check must wake the loop then, as for a node it declares down
        self._awaiting_margin.update(
            nid for nid, s in self.state.nodes.items() if s.value.state == pb.NODE_STATE_DOWN
        )
        log.info(
            "state loaded revision=%d services=%d tasks=%d nodes=%d",
            loaded.revision,
            len(self.state.services),
            len(self.state.tasks),
            len(self.state.nodes),
        )
        self._tasks = [
            asyncio.create_task(self._run_loop(), name="reconcile-loop"),
            asyncio.create_task(self._watch_liveness(), name="liveness"),
            asyncio.create_task(self._flush_statuses(), name="status-flush"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def trigger(self) -> None:
        self._wake.set()

    # -- the one writer ----------------------------------------------------------------

    async def _commit(self, ops: Sequence[Op]) -> None:
        """Commit ops, then fold every transaction that committed into the cache, in the order
        the store reported them, and tell the agents concerned. Both wait for the end of the
        call, also when it fails or is cancelled part-way:

        - folding: the event loop that folds is the one that encodes the next transactions, and
          folding as each one committed kept etcd waiting on the controller (at 100,000 tasks the
          commit took half as long again). The writer lock is held until the cache has caught up
          with every transaction the store reported (one whose reply was lost leaves the cache
          uncertain: the next writer reloads);
        - telling: told as each transaction committed, thousands of agents started work (and
          reported it) while etcd still took the rest, and on a busy machine their reaction
          made the commit twice as slow, with every task running no sooner.

        (bench/README.md, sessions 6 and 7.) Caller holds the writer lock. A failed transaction
        raises; the others of the call may have committed, and those are in the cache and on
        their way to the agents."""
        if not ops:
            return
        committed: list[tuple[Sequence[Op], dict[str, int]]] = []
        try:
            try:
                await self.store.commit(
                    ops, on_batch=lambda batch, revisions: committed.append((batch, revisions))
                )
            except BaseException:
                self._catch_up_at_once(committed)
                raise
            await self._catch_up(committed)
        except ConflictError:
            log.warning("write conflict; reloading state from etcd")
            await self._reload()
            raise UnavailableError("state changed concurrently; retry") from None
        except StoreError as exc:
            # the write may have committed without our hearing of it (a timeout, a dropped
            # connection): the cache and the agents may now be behind etcd
            self._uncertain = True
            raise UnavailableError(str(exc)) from exc
        except Exception as exc:  # folding a committed transaction failed: the cache may be off
            log.exception("applying a commit failed; reloading state from etcd")
            await self._reload()
            raise UnavailableError("internal error applying a commit; state reloaded from etcd") from exc
        except BaseException:
            # cancelled (the caller's RPC deadline passed, or its client went away) while
            # transactions were in flight: some may have committed without our hearing of it
            self._uncertain = True
            raise

    async def _catch_up(self, committed: Sequence[tuple[Sequence[Op], dict[str, int]]]) -> None:
        """Fold a commit that went through, then tell the agents. Every ``FOLD_CHUNK``
        transactions it lets the event loop answer heartbeats (100,000 tasks take most of a
        second to fold); cancelled meanwhile, it folds the rest at once before giving way."""
        outgoing: list[tuple[str, agent_pb2.ControllerMessage]] = []
        done = 0
        try:
            for batch, revisions in committed:
                self._fold(batch, revisions, outgoing=outgoing)
                done += 1
                if done % FOLD_CHUNK == 0 and done < len(committed):
                    await asyncio.sleep(0)
        except asyncio.CancelledError:  # (raised only by the yield: the folds do not await)
            self._fold_rest(committed[done:], outgoing)
            raise
        finally:
            self._send(outgoing)

    def _catch_up_at_once(self, committed: Sequence[tuple[Sequence[Op], dict[str, int]]]) -> None:
        """Fold what committed of a call that is failing or cancelled, then tell the agents,
        without yielding (see ``_fold_rest``)."""
        outgoing: list[tuple[str, agent_pb2.ControllerMessage]] = []
        try:
            self._fold_rest(committed, outgoing)
        finally:
            self._send(outgoing)

    def _fold_rest(
        self,
        committed: Sequence[tuple[Sequence[Op], dict[str, int]]],
        outgoing: list[tuple[str, agent_pb2.ControllerMessage]],
    ) -> None:
        """Fold ``committed`` while an exception (or a cancellation) is on its way out: a fold
        that fails leaves the cache uncertain (the next writer reloads) instead of taking the
        place of that exception."""
        try:
            for batch, revisions in committed:
                self._fold(batch, revisions, outgoing=outgoing)
        except Exception:
            log.exception("applying a commit failed; the next writer reloads state from etcd")
            self._uncertain = True

    def _send(self, outgoing: Sequence[tuple[str, agent_pb2.ControllerMessage]]) -> None:
        for node_id, message in outgoing:  # in the order the transactions were folded
            self.hub.send(node_id, message)

    def _fold(
        self,
        batch: Sequence[Op],
        revisions: dict[str, int],
        *,
        outgoing: list[tuple[str, agent_pb2.ControllerMessage]],
    ) -> None:
        """Fold one committed transaction into the cache and add to ``outgoing`` what each agent
        concerned must now run or stop (``_commit`` sends it): the difference in what the cache
        says the node holds before and after the transaction. A drained task moves from its slot
        to ``retiring/`` on the same node in one transaction (the two writes are chained with
        ``with_next``), so it is neither; a task told to stop moves the same way with desired
        state SHUTDOWN, and is sent again so."""
        touched: set[tuple[str, str]] = set()  # (node id, task id)
        tasks, retiring, statuses = self.keys.tasks, self.keys.retiring, self.keys.statuses
        if not all(op.key.startswith(statuses) for op in batch):
            self._plan_inputs += 1
        for op in batch:
            if not op.key.startswith((tasks, retiring)):
                continue
            old = self.state.value_of(op.key)
            if old is not None and old.node_id:
                touched.add((old.node_id, old.id))
            if isinstance(op, Put) and isinstance(op.value, pb.Task) and op.value.node_id:
                touched.add((op.value.node_id, op.value.id))
        on_node = self.state.on_node
        # (node, task) -> the desired state it was held with
        held_before = {
            (n, t): held.desired_state for n, t in touched if (held := on_node.get(n, {}).get(t)) is not None
        }
        self.state.apply(batch, revisions)
        added: dict[str, list[pb.Task]] = defaultdict(list)
        removed: dict[str, list[str]] = defaultdict(list)
        for node_id, task_id in touched:
            held = on_node.get(node_id, {}).get(task_id)
            before = held_before.get((node_id, task_id))
            if held is not None and (before is None or before != held.desired_state):
                added[node_id].append(held)
            elif held is None and before is not None:
                removed[node_id].append(task_id)
        for node_id in added.keys() | removed.keys():
            # filled in place: a nested constructor would copy every task (and its spec) twice
            message = agent_pb2.ControllerMessage()
            assignments = message.assignments
            assignments.full = False
            assignments.tasks.extend(sorted(added.get(node_id, []), key=_service_slot))
            assignments.removed.extend(sorted(removed.get(node_id, [])))
            outgoing.append((node_id, message))

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """The writer lock, held over a cache that matches etcd: after a write whose outcome is
        unknown, the next writer reads etcd again first (and fails with Unavailable while it
        cannot), so nothing is decided on a stale view and agents learn what did commit."""
        async with self._lock:
            if self._uncertain and not await self._reload():
                raise UnavailableError(f"etcd at {self.store.endpoint} cannot be read; retry")
            yield

    async def _reload(self) -> bool:
        """Rebuild the cache from etcd and resend every agent its full assignment; False (and
        nothing changed) if etcd cannot be read."""
        self._uncertain = True  # until the new state is in place (a cancelled reload leaves it so)
        try:
            loaded = await self.store.load()
        except StoreError as exc:
            log.error("reload failed: %s", exc)
            return False
        ready = pb.NODE_STATE_READY
        was_ready = {nid for nid, s in self.state.nodes.items() if s.value.state == ready}
        self.state = ClusterState.from_loaded(self.keys, loaded)
        self._plan_inputs += 1
        self._uncertain = False
        # a node ready in etcd but not in the cache registered in a write whose reply we missed:
        # as at start, it gets a fresh deadline before it is judged (its last message may be old)
        self.liveness.fresh(
            nid for nid, s in self.state.nodes.items() if s.value.state == ready and nid not in was_ready
        )
        self._ready_heard_since = None  # the reloaded records may make other nodes ready
        # the cache may have missed writes (ours whose outcome we did not learn, or a concurrent
        # writer's): every connected agent gets the full list of what it must run, as on reconnect
        for node_id in self.state.nodes:
            tasks = sorted(self.state.tasks_on(node_id), key=_service_slot)
            message = agent_pb2.ControllerMessage(assignments=agent_pb2.Assignments(full=True, tasks=tasks))
            self.hub.send(node_id, message)
        return True

    def _let_go_ops(self, key: str, task: pb.Task) -> list[Op]:
        """Forget a task that is no longer wanted (scaled away, its service removed). An
        at-most-one task placed on a node is not forgotten while it may run: it retires with
        desired state SHUTDOWN, like a stop-first move, so that its slot, if wanted again before
        it has stopped (scaled back up, the service created again), waits for it."""
        if task.desired_state == pb.TASK_STATE_SHUTDOWN:
            return []  # already told to stop; dropped once it has
        if not task.node_id or not _at_most_one(task):
            return self._delete_task_ops(key, task)
        stopping = _told_to_stop(task)
        retiring = self.keys.retiring_task(task.id)
        if key == retiring:
            return [self.state.put(retiring, stopping)]
        return [replace(self.state.delete(key), with_next=True), self.state.put(retiring, stopping)]

    def _delete_task_ops(self, key: str, task: pb.Task) -> list[Op]:
        ops: list[Op] = [self.state.delete(key)]
        if task.id in self.state.statuses:
            ops.append(self.state.delete(self.keys.status(task.id)))
        return ops

    # -- services ----------------------------------------------------------------------

    @staticmethod
    def _validate(spec: pb.ServiceSpec) -> None:
        try:
            validate_spec(spec)
        except SpecError as exc:
            raise InvalidError(str(exc)) from exc

    async def create_service(self, spec: pb.ServiceSpec) -> pb.Service:
        self._validate(spec)
        async with self._writing():
            if spec.name in self.state.services:
                raise AlreadyExistsError(
                    f"name: service {spec.name!r} already exists; use `berth service apply` to change it "
                    "or choose another name"
                )
            service = await self._put_service(spec, previous=None)
        self.events.publish("service-created", f"{spec.replicas} replicas of {spec.image}", service=spec.name)
        self.trigger()
        return service

    async def apply_service(self, spec: pb.ServiceSpec) -> tuple[pb.Service, bool, bool]:
        """Create or update; returns (service, created, changed)."""
        self._validate(spec)
        async with self._writing():
            stored = self.state.services.get(spec.name)
            if stored is not None and stored.value.spec == spec:
                return stored.value, False, False
            previous = stored.value if stored else None
            bump = previous is None or needs_new_tasks(previous.spec, spec)
            service = await self._put_service(spec, previous=previous, bump_generation=bump)
        kind = "service-created" if stored is None else "service-updated"
        self.events.publish(
            kind, f"generation {service.generation}, {spec.replicas} replicas", service=spec.name
        )
        self.trigger()
        return service, stored is None, True

    async def scale_service(self, name: str, replicas: int) -> pb.Service:
        async with self._writing():
            stored = self.state.services.get(name)
            if stored is None:
                raise NotFoundError(f"service {name!r} not found; `berth service ls` lists services")
            spec = pb.ServiceSpec()
            spec.CopyFrom(stored.value.spec)
            spec.replicas = replicas
            self._validate(spec)
            if spec == stored.value.spec:
                return stored.value
            service = await self._put_service(spec, previous=stored.value, bump_generation=False)
        self.events.publish(
            "service-scaled", f"{stored.value.spec.replicas} -> {replicas} replicas", service=name
        )
        self.trigger()
        return service

    async def _put_service(
        self, spec: pb.ServiceSpec, *, previous: pb.Service | None, bump_generation: bool = True
    ) -> pb.Service:
        now = self.clock()
        service = pb.Service(spec=spec, created_at=now, updated_at=now, generation=1)
        if previous is not None:
            service.created_at = previous.created_at
            # scaling changes the count, not what each task runs: keep the generation so
            # existing tasks stay; any other change replaces the tasks
            service.generation = previous.generation + (1 if bump_generation else 0)
        await self._commit([self.state.put(self.keys.service(spec.name), service)])
        return service

    async def remove_service(self, name: str) -> None:
        async with self._writing():
            if name not in self.state.services:
                raise NotFoundError(f"service {name!r} not found; `berth service ls` lists services")
            ops: list[Op] = [self.state.delete(self.keys.service(name))]
            for key, task in self.state.tasks_of(name):
                ops += self._let_go_ops(key, task)
            for task_id, stored in list(self.state.retiring.items()):
                if stored.value.service == name:
                    ops += self._let_go_ops(self.keys.retiring_task(task_id), stored.value)
            await self._commit(ops)
        self.events.publish("service-removed", service=name)

    # -- views -------------------------------------------------------------------------

    def service_view(self, name: str) -> cluster_pb2.ServiceView:
        stored = self.state.services.get(name)
        if stored is None:
            raise NotFoundError(f"service {name!r} not found; `berth service ls` lists services")
        tasks = [t for _, t in self.state.tasks_of(name)]
        return cluster_pb2.ServiceView(
            service=stored.value,
            running=sum(1 for t in tasks if self.observed_running(t)),
            pending=sum(1 for t in tasks if not t.node_id),
        )

    def service_views(self) -> list[cluster_pb2.ServiceView]:
        return [self.service_view(name) for name in sorted(self.state.services)]

    def _task_view(self, task: pb.Task) -> cluster_pb2.TaskView:
        view = cluster_pb2.TaskView(task=task)
        status = self.state.status_of(task.id)
        if status is not None:
            view.status.CopyFrom(status)
        node = self.state.nodes.get(task.node_id)
        if node is not None:
            view.node_name = node.value.name
            view.node_address = node.value.address
        return view

    def task_views(self, service: str = "") -> list[cluster_pb2.TaskView]:
        if service and service not in self.state.services:
            raise NotFoundError(f"service {service!r} not found; `berth service ls` lists services")
        names = [service] if service else sorted(self.state.services)
        views = []
        for name in names:
            views += [self._task_view(task) for _, task in self.state.tasks_of(name)]
            retiring = sorted(
                (s.value for s in self.state.retiring.values() if s.value.service == name),
                key=lambda t: t.slot,
            )
            views += [self._task_view(task) for task in retiring]
        return views

    def node_views(self) -> list[cluster_pb2.NodeView]:
        by_node = self.state.tasks_by_node()
        return [
            self._node_view(s.value, by_node.get(s.value.id, []))
            for s in sorted(self.state.nodes.values(), key=lambda s: s.value.name)
        ]

    @staticmethod
    def _node_view(node: pb.Node, tasks: Sequence[pb.Task]) -> cluster_pb2.NodeView:
        return cluster_pb2.NodeView(
            node=node, allocated=placement.to_pb_resources(placement.allocated_by(tasks)), tasks=len(tasks)
        )

    # -- nodes -------------------------------------------------------------------------

    def _node(self, ref: str) -> pb.Node:
        node = self.state.node_by_ref(ref)
        if node is None:
            raise NotFoundError(f"node {ref!r} not found; `berth node ls` lists nodes")
        return node

    async def set_availability(
        self, ref: str, availability: pb.NodeAvailability.ValueType
    ) -> cluster_pb2.NodeView:
        if availability not in (
            pb.NODE_AVAILABILITY_ACTIVE,
            pb.NODE_AVAILABILITY_PAUSE,
            pb.NODE_AVAILABILITY_DRAIN,
        ):
            raise InvalidError("availability: must be active, pause or drain")
        async with self._writing():
            node = _copy_node(self._node(ref))
            if node.availability != availability:
                node.availability = availability
                await self._commit([self.state.put(self.keys.node(node.id), node)])
                kind = {
                    pb.NODE_AVAILABILITY_ACTIVE: "node-active",
                    pb.NODE_AVAILABILITY_PAUSE: "node-pause",
                }.get(availability, "node-drain")
                self.events.publish(kind, node_id=node.id, node=node.name)
            view = self._node_view(node, self.state.tasks_on(node.id))
        self.trigger()
        return view

    async def remove_node(self, ref: str) -> None:
        async with self._writing():
            node = self._node(ref)
            if node.state != pb.NODE_STATE_DOWN:
                state = pb.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower()
                raise FailedPreconditionError(
                    f"node {node.name!r} is {state}; only a down node can be removed "
                    "(drain it and stop its agent first)"
                )
            wait = self.liveness.deadline + self.margin - self.liveness.silent_for(node.id)
            at_most_one = any(
                t.spec.on_disconnect == pb.ON_DISCONNECT_STOP for t in self.state.tasks_on(node.id)
            )
            if at_most_one and wait > 0:
                # its tasks would be placed elsewhere at once, while its agent may still be
                # stopping them: the same margin as failover (docs/failure-handling.md)
                raise FailedPreconditionError(
                    f"node {node.name!r} holds at-most-one tasks its agent may still be stopping; "
                    f"it can be removed in {wait:.1f}s"
                )
            ops: list[Op] = [self.state.delete(self.keys.node(node.id))]
            for task_id, stored in list(self.state.retiring.items()):
                if stored.value.node_id == node.id:
                    ops += self._delete_task_ops(self.keys.retiring_task(task_id), stored.value)
            await self._commit(ops)
            self.liveness.forget(node.id)
        self.events.publish("node-removed", node_id=node.id, node=node.name)
        self.trigger()

    # -- agents ------------------------------------------------------------------------

    async def register(self, reg: agent_pb2.Register) -> tuple[Session, list[pb.Task]]:
        """Record the node as ready and attach its stream; returns the session and its full assignment."""
        if not reg.node_id or not reg.name:
            raise InvalidError("register: node_id and name are required")
        now = self.clock()
        async with self._writing():
            ops: list[Op] = []
            same_name = self.state.node_by_name(reg.name)
            if same_name is not None and same_name.id != reg.node_id:
                if self.hub.connected(same_name.id):
                    raise AlreadyExistsError(
                        f"a connected node is already named {reg.name!r}; give this agent another --name"
                    )
                # the host was re-created with a fresh state dir: the old record goes, its tasks
                # go back to pending through the reconciler
                ops.append(self.state.delete(self.keys.node(same_name.id)))
            previous = self.state.nodes.get(reg.node_id)
            node = pb.Node(
                id=reg.node_id,
                name=reg.name,
                address=reg.address,
                capacity=reg.capacity,
                labels=dict(reg.labels),
                availability=pb.NODE_AVAILABILITY_ACTIVE,
                state=pb.NODE_STATE_READY,
                registered_at=now,
                state_changed_at=now,
                metrics_address=reg.metrics_address,
                agent_version=reg.agent_version,
            )
            was_down = previous is not None and previous.value.state == pb.NODE_STATE_DOWN
            if previous is not None:
                node.availability = previous.value.availability or pb.NODE_AVAILABILITY_ACTIVE
                node.registered_at = previous.value.registered_at
                if not was_down:
                    node.state_changed_at = previous.value.state_changed_at
            if previous is None or previous.value != node:
                ops.append(self.state.put(self.keys.node(reg.node_id), node))
            await self._commit(ops)
            if self.liveness.scale_to(len(self.state.nodes)):
                log.info(
                    "heartbeat timing stretched nodes=%d interval=%.2fs deadline=%.1fs",
                    len(self.state.nodes),
                    self.liveness.interval,
                    self.liveness.deadline,
                )
            self.liveness.seen(reg.node_id)
            session = self.hub.attach(reg.node_id)
            assigned = self.state.tasks_on(reg.node_id)
        if previous is None:
            self.events.publish("node-joined", f"address {reg.address}", node_id=node.id, node=node.name)
        elif was_down:
            self.events.publish(
                "node-up", f"{len(assigned)} tasks still assigned", node_id=node.id, node=node.name
            )
        self.trigger()
        return session, assigned

    def heard(self, session: Session) -> None:
        """Any message on a node's current stream renews its deadline."""
        if self.hub.is_current(session):
            self.liveness.seen(session.node_id)

    async def disconnect(self, session: Session) -> None:
        """The stream closed. The node is judged by its deadline, not by the stream: an agent
        restart reconnects well inside it and reschedules nothing."""
        if self.hub.detach(session):
            log.info("agent stream closed node=%s", session.node_id)

    async def record_statuses(self, session: Session, statuses: Sequence[pb.TaskStatus]) -> None:
        """Queue what the agent observed; a flusher writes the latest status of each task in
        batched transactions (agents report several states per task start: writing each in its own
        round trip would cap throughput near etcd's ~2,000 single writes/s). Events go out now."""
        if not self.hub.is_current(session):
            return
        inbox, events = self._status_inbox, self.events
        for status in statuses:
            task_id = status.task_id
            previous = inbox.get(task_id) or self.state.status_of(task_id)
            if previous == status:
                continue
            kind = _STATE_EVENTS.get(status.state)
            if (
                kind is not None
                and (previous is None or previous.state != status.state)
                and events.wants(kind)
            ):
                task = self.state.task_by_id(status.task_id)
                node = self.state.nodes.get(session.node_id)
                events.publish(
                    kind,
                    status.error or status.message,
                    node_id=session.node_id,
                    node=node.value.name if node else "",
                    service=task.service if task else task_id.split(".")[0],
                    task=task_id,
                )
            inbox[task_id] = status
        self._status_wake.set()

    async def _flush_statuses(self) -> None:
        while True:
            await self._status_wake.wait()
            await asyncio.sleep(STATUS_FLUSH_DELAY)  # let a burst of reports coalesce
            self._status_wake.clear()
            inbox, self._status_inbox = self._status_inbox, {}
            try:
                await self._write_statuses(inbox)
            except UnavailableError as exc:
                log.warning("statuses not recorded yet: %s", exc)
                for task_id, status in inbox.items():  # keep them, unless a newer one arrived
                    self._status_inbox.setdefault(task_id, status)
                await asyncio.sleep(0.5)
                self._status_wake.set()
            except Exception:
                log.exception("status flush failed")

    async def _write_statuses(self, inbox: dict[str, pb.TaskStatus]) -> None:
        """Write what agents observed, under the writer lock. Reports that arrive while another
        write holds it (a placement pass) queue in the inbox, coalesced per task, and go out in
        one batch when that write is done, rather than compete with it for the event loop."""
        running = stopped = False
        async with self._writing():
            ops: list[Op] = []
            for task_id, status in inbox.items():
                previous = self.state.status_of(task_id)
                if self.state.task_by_id(task_id) is None or previous == status:
                    continue
                if previous is not None and previous.state == pb.TASK_STATE_LOST:
                    # a report about a task the controller marked lost (its node is down): the
                    # next pass must judge it again, even if its last plan placed nothing
                    self._fruitless = None
                ops.append(self.state.put(self.keys.status(task_id), status))
                running = running or status.state == pb.TASK_STATE_RUNNING
                if status.state == pb.TASK_STATE_SHUTDOWN:
                    told = self.state.retiring.get(task_id)
                    stopped = stopped or (
                        told is not None and told.value.desired_state == pb.TASK_STATE_SHUTDOWN
                    )
            await self._commit(ops)
        if running:
            self._check_failovers()
        if (running and self.state.retiring) or stopped:
            # a replacement may now run: its retiring predecessor can go; or a task told to stop
            # has stopped: the new task waiting in its slot can be placed
            self.trigger()

    # -- liveness ----------------------------------------------------------------------

    async def _watch_liveness(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(LIVENESS_TICK)
            now = time.monotonic()
            if now - last > STALL_LIMIT:
                # this process could not read its streams for a while: silence is not evidence
                log.warning("controller stalled for %.1fs; giving every node a fresh deadline", now - last)
                self.liveness.fresh(self.state.nodes)
            last = now
            try:
                await self.check_liveness()
            except UnavailableError as exc:
                log.warning("liveness check deferred: %s", exc)
            except Exception:
                log.exception("liveness check failed")

    async def check_liveness(self) -> None:
        for node_id in list(self._awaiting_margin):
            stored = self.state.nodes.get(node_id)
            if stored is None or stored.value.state != pb.NODE_STATE_DOWN:
                self._awaiting_margin.discard(node_id)
            elif self.liveness.silent_for(node_id) > self.liveness.deadline + self.margin:
                self._awaiting_margin.discard(node_id)
                self.trigger()  # its at-most-one tasks may be replaced now
        heard_since = self._ready_heard_since
        if heard_since is not None and self.liveness.none_silent_since(heard_since):
            return  # no ready node can have passed its deadline yet: skip the scan of every node
        ready = [nid for nid, s in self.state.nodes.items() if s.value.state == pb.NODE_STATE_READY]
        expired, heard_since = self.liveness.scan(ready)
        if not expired:
            self._ready_heard_since = heard_since
            return
        self._ready_heard_since = None
        async with self._writing():
            now = self.clock()
            ops: list[Op] = []
            down: list[pb.Node] = []
            # re-judge under the lock: waiting for it (behind a big placement pass) may have let
            # the node's heartbeats through again
            silence = {node_id: self.liveness.silent_for(node_id) for node_id in expired}
            for node_id in expired:
                stored = self.state.nodes.get(node_id)
                if stored is None or stored.value.state != pb.NODE_STATE_READY:
                    continue
                if silence[node_id] <= self.liveness.deadline:
                    continue
                node = _copy_node(stored.value)
                node.state = pb.NODE_STATE_DOWN
                node.state_changed_at = now
                ops.append(self.state.put(self.keys.node(node_id), node))
                down.append(node)
            await self._commit(ops)
        for node in down:
            self._awaiting_margin.add(node.id)
            self.metrics.node_down_events.inc()
            held = {
                self.state.task_key_by_id[t.id]: t.id
                for t in self.state.tasks_on(node.id)
                if t.id in self.state.task_key_by_id
            }
            self._failovers[node.id] = (time.monotonic(), held)
            silent = silence[node.id]
            self.events.publish(
                "node-down", f"no heartbeat for {silent:.1f}s", node_id=node.id, node=node.name
            )
            for task in self.state.tasks_on(node.id):
                self.events.publish(
                    "task-lost",
                    f"node {node.name} down",
                    node_id=node.id,
                    node=node.name,
                    service=task.service,
                    task=task.id,
                )
        self.trigger()

    # -- the loop ----------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=RESYNC_INTERVAL)
            await self._coalesce()
            try:
                await self.reconcile_once()
            except UnavailableError as exc:
                log.warning("reconcile deferred: %s", exc)
                await asyncio.sleep(0.5)
                self.trigger()
            except Exception:
                log.exception("reconcile failed")
                await asyncio.sleep(1.0)

    async def _coalesce(self) -> None:
        """Let a burst of changes become one pass: wait until no trigger came for COALESCE_DELAY,
        at most COALESCE_MAX. A hundred services created at once are then placed in one plan and
        one commit, instead of a first pass with the few that made it and the rest queued behind
        it on the writer lock; a lone change waits COALESCE_DELAY, as before."""
        deadline = time.monotonic() + COALESCE_MAX
        while True:
            self._wake.clear()
            await asyncio.sleep(COALESCE_DELAY)
            if not self._wake.is_set() or time.monotonic() >= deadline:
                self._wake.clear()
                return

    async def reconcile_once(self) -> None:
        started = time.perf_counter()
        try:
            await self._reconcile_once()
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)
        self._check_failovers()

    async def _reconcile_once(self) -> None:
        async with self._writing():
            now = self.clock()
            # pure and O(tasks): off the event loop, like the scheduler, so heartbeats and
            # status reports keep flowing while 100,000 slots are compared
            result = await asyncio.to_thread(
                reconcile,
                services={name: s.value for name, s in self.state.services.items()},
                tasks={key: s.value for key, s in self.state.tasks.items()},
                node_ids=set(self.state.nodes),
                task_key=self.keys.task,
                new_id=_new_task_id,
                now=now,
            )
            # new and replaced tasks are not written yet: they go to etcd once, already placed
            # (or with their pending reason), in the same batch as the rest of this pass
            ops: list[Op] = []
            fresh = dict(result.put)
            for key, task in result.put:
                old = self.state.tasks.get(key)
                if old is not None and old.value.id != task.id and old.value.id in self.state.statuses:
                    ops.append(self.state.delete(self.keys.status(old.value.id)))
            for key in result.delete:
                ops += self._let_go_ops(key, self.state.tasks[key].value)
            if result.put or result.delete:
                log.info("reconciled created_or_replaced=%d removed=%d", len(result.put), len(result.delete))
            await self._retire_replaced()
            await self._schedule(now, fresh=fresh, deleted=set(result.delete), ops=ops)

    async def _retire_replaced(self) -> None:
        """Drop retiring tasks whose replacement runs (or whose slot or node is gone), and the
        ones told to stop (stop first) once stopped: their slot's new task is placed next."""
        ops: list[Op] = []
        for task_id, stored in list(self.state.retiring.items()):
            old = stored.value
            current = self.state.value_of(self.keys.task(old.service, old.slot))
            node = self.state.nodes.get(old.node_id)
            if old.desired_state == pb.TASK_STATE_SHUTDOWN:
                # (not when its slot is gone: wanted again, the slot must still wait for it)
                why = self._stopped(old, node.value if node else None)
            else:
                done = current is None or (current.id != old.id and self.state.is_running(current))
                gone = node is None or node.value.state == pb.NODE_STATE_DOWN
                why = "its replacement runs" if done or gone else ""
            if why:
                ops += self._delete_task_ops(self.keys.retiring_task(task_id), old)
                self.events.publish(
                    "task-retired",
                    why,
                    node_id=old.node_id,
                    node=node.value.name if node else "",
                    service=old.service,
                    task=old.id,
                )
        await self._commit(ops)

    def _stopped(self, task: pb.Task, node: pb.Node | None) -> str:
        """Why a task told to stop can be taken as stopped ("" while it may still run): its
        agent reported it so, or its node is gone, or its node is down and has been silent long
        enough that its agent's watchdog stopped it (at-most-one: docs/failure-handling.md)."""
        status = self.state.status_of(task.id)
        if status is not None and status.state == pb.TASK_STATE_SHUTDOWN and status.node_id == task.node_id:
            return "it has stopped"
        if node is None:
            return "its node was removed"
        if node.state == pb.NODE_STATE_DOWN and (
            self.liveness.silent_for(node.id) > self.liveness.deadline + self.margin
        ):
            return f"node {node.name} down for the deadline and margin: its agent stopped it"
        return ""

    def snapshot(self) -> Snapshot:
        return Snapshot(
            services={n: s.value for n, s in self.state.services.items()},
            tasks={k: s.value for k, s in self.state.tasks.items()},
            nodes={nid: s.value for nid, s in self.state.nodes.items()},
            retiring=[s.value for s in self.state.retiring.values()],
        )

    async def plan(self, specs: Sequence[pb.ServiceSpec]) -> cluster_pb2.PlanResponse:
        """What applying ``specs`` would do now; changes nothing (``berth plan``). Planned off
        the event loop, like a real pass: on a large cluster it takes seconds, and heartbeats
        must keep being answered meanwhile."""
        names = set()
        for spec in specs:
            self._validate(spec)
            if spec.name in names:
                raise InvalidError(f"name: service {spec.name!r} appears twice in the plan")
            names.add(spec.name)
        what_if = functools.partial(
            preview,
            self.snapshot(),
            specs,
            now=self.clock(),
            task_key=self.keys.task,
            silent_for=self.liveness.silent_for,
            deadline=self.liveness.deadline,
            margin=self.margin,
        )
        # one worker of its own: plans queue behind each other (a plan whose client gave up
        # still runs to its end) and never hold up the real pass, which uses the default pool
        return await asyncio.get_running_loop().run_in_executor(self._planner, what_if)

    async def _schedule(
        self, now: float, *, fresh: dict[str, pb.Task], deleted: set[str], ops: list[Op]
    ) -> None:
        """Place pending tasks (stored ones and the ``fresh`` ones the reconciler just made) and
        replacements for tasks on down or draining nodes, in one plan; commit it with ``ops``."""
        snap = self.snapshot()
        if fresh or deleted:
            tasks = {k: t for k, t in snap.tasks.items() if k not in deleted}
            tasks.update(fresh)
            snap = Snapshot(services=snap.services, tasks=tasks, nodes=snap.nodes, retiring=snap.retiring)
        # the scheduler is CPU-bound: run it off the event loop so heartbeats keep being
        # acknowledged while a large batch is placed (we hold the writer lock meanwhile)
        started = time.perf_counter()
        version = self._plan_inputs
        # this pass's own reconcile writes (not committed yet) change the inputs too
        fruitless = None if fresh or deleted else self._fruitless

        def worth_planning(work: Work) -> bool:
            # like Nomad's blocked evaluations: work that placed nothing waits for a change
            # (a node, a task, a service) instead of being planned again every pass
            return fruitless != (version, work)

        step = await asyncio.to_thread(
            scheduling_step,
            snap,
            silent_for=self.liveness.silent_for,
            deadline=self.liveness.deadline,
            margin=self.margin,
            now=now,
            new_id=_new_task_id,
            worth_planning=worth_planning if fruitless is not None else None,
        )
        moved: list[tuple[Replacement, pb.Task]] = []
        for r, new in step.stops.values():  # at-most-one updates: the old spec must go
            ops += self._stop_first(r, new)
            moved.append((r, new))
        for key, task in list(fresh.items()):
            old_id = step.held.get((task.service, task.slot))
            if old_id is not None:  # made while its slot's old task still stops: it waits too
                ops.append(self.state.put(key, placement.with_reason(task, held_reason(old_id))))
                del fresh[key]
        if step.plan is None:
            if not step.replacements:
                self._kept.clear()  # no task waits for a replacement
            ops += [self.state.put(key, task) for key, task in fresh.items()]
            await self._commit(ops)
            self._publish_moves(moved)
            return
        plan, pending, replacements = step.plan, step.pending, step.replacements
        before = len(ops)
        # written node by node: a transaction then holds the tasks of a few nodes, and each of
        # those agents gets all its new work in one message
        for p in sorted(plan.placements, key=_node_id):
            if p.task_id in pending:
                key, task = pending[p.task_id]
                ops.append(self.state.put(key, placement.placed(task, p, now, in_place=key in fresh)))
            else:
                r, new = replacements[p.task_id]
                if r.stop_first:  # planned only to know that a node can take it: see _stop_first
                    ops += self._stop_first(r, new)
                    moved.append((r, new))
                    continue
                slot = self.state.put(r.key, placement.placed(new, p, now))
                if r.retire:
                    # one transaction: the old task moves from its slot to retiring/ without ever
                    # being unassigned, so its agent keeps running it until the new one runs
                    ops.append(replace(slot, with_next=True))
                    ops.append(self.state.put(self.keys.retiring_task(r.old.id), r.old))
                else:
                    ops.append(slot)
                    if r.old.id in self.state.statuses:
                        ops.append(self.state.delete(self.keys.status(r.old.id)))
                moved.append((r, new))
        waiting = {replacements[w.task_id][0].old.id for w in plan.pending if w.task_id in replacements}
        self._kept = {task_id: why for task_id, why in self._kept.items() if task_id in waiting}
        for w in plan.pending:
            if w.task_id in pending:
                key, task = pending[w.task_id]
                if task.pending_reason != w.reason or key in fresh:
                    ops.append(self.state.put(key, placement.with_reason(task, w.reason)))
            else:
                r, _ = replacements[w.task_id]
                ops += self._mark_unreplaced(r, w.reason)
        planned = time.perf_counter()
        placed_nothing = not plan.placements and len(ops) == before  # and nothing to write
        self._fruitless = None
        await self._commit(ops)
        if placed_nothing:
            # the same work waits for a change; the version counts this pass's own writes (the
            # reconciler's deletes), which the plan already took into account
            self._fruitless = (self._plan_inputs, step.work())
        waiting = {new.id for r, new in moved if r.stop_first}  # planned, placed later
        placed = [p for p in plan.placements if p.task_id not in waiting]
        self.metrics.scheduling_attempts.labels("placed").inc(len(placed))
        self.metrics.scheduling_attempts.labels("pending").inc(len(plan.pending))
        latency = self.metrics.placement_latency
        for p in placed:
            created = pending[p.task_id][1] if p.task_id in pending else replacements[p.task_id][1]
            latency.observe(max(0.0, now - created.created_at))
        log.info(
            "placement pass placed=%d pending=%d plan_s=%.3f commit_s=%.3f writes=%d",
            len(placed),
            len(plan.pending),
            planned - started,
            time.perf_counter() - planned,
            len(ops),
        )
        names = {nid: s.value.name for nid, s in self.state.nodes.items()}
        for p in placed if self.events.wants("task-placed") else ():
            placed_task = self.state.task_by_id(p.task_id)
            self.events.publish(
                "task-placed",
                node_id=p.node_id,
                node=names.get(p.node_id, ""),
                service=placed_task.service if placed_task else "",
                task=p.task_id,
            )
        self._publish_moves(moved)

    def _publish_moves(self, moved: Sequence[tuple[Replacement, pb.Task]]) -> None:
        for r, new in moved:
            self.events.publish(
                "task-replaced",
                f"{r.reason}: replaced by {new.id}" + (" once it has stopped" if r.stop_first else ""),
                node_id=r.old.node_id,
                node=self._node_name(r.old.node_id),
                service=r.old.service,
                task=r.old.id,
            )

    # -- metrics -----------------------------------------------------------------------

    def _check_failovers(self) -> None:
        """Observe the failover time of every down node whose tasks all run again: replaced
        elsewhere, reclaimed after it came back, or no longer wanted (scaled down, removed)."""
        for node_id, (since, held) in list(self._failovers.items()):
            stored = self.state.nodes.get(node_id)
            back = stored is not None and stored.value.state == pb.NODE_STATE_READY
            left = {key: old for key, old in held.items() if not self._slot_recovered(key, old, back)}
            if left:
                self._failovers[node_id] = (since, left)
                continue
            del self._failovers[node_id]
            self.metrics.failover.observe(time.monotonic() - since)

    def _slot_recovered(self, key: str, old_id: str, node_back: bool) -> bool:
        current = self.state.tasks.get(key)
        if current is None:
            return True
        if current.value.id == old_id and not node_back:
            return False
        return self.state.is_running(current.value)

    def observed_running(self, task: pb.Task) -> bool:
        """Running as far as anyone can tell: its agent reported it running, and that agent was
        heard from within two heartbeat intervals. A silent node's tasks stop counting before the
        node is declared down, so `service ls` and /metrics show a lost host as a dip."""
        if not self.state.is_running(task):
            return False
        node = self.state.nodes.get(task.node_id)
        if node is None or node.value.state != pb.NODE_STATE_READY:
            return False
        return self.liveness.silent_for(task.node_id) <= SUSPECT_INTERVALS * self.liveness.interval

    def state_view(self) -> StateView:
        """The state series of /metrics (called on the event loop at every scrape)."""
        view = StateView()
        for name, service in self.state.services.items():
            view.desired[name] = service.value.spec.replicas
            view.running[name] = 0
            # every reason of every service, 0 included (as kube-state-metrics does for phases):
            # a query or alert sees "none pending" rather than no series at all
            view.pending.update({(name, reason): 0 for reason in PENDING_REASONS})
        for stored_task in self.state.tasks.values():
            task = stored_task.value
            if not task.node_id:
                key = (task.service, reason_code(task.pending_reason))
                view.pending[key] = view.pending.get(key, 0) + 1
            elif task.service in view.running and self.observed_running(task):
                view.running[task.service] += 1
        for stored_node in self.state.nodes.values():
            node = stored_node.value
            cap = node.capacity
            capacity = {"cpu": cap.cpu_millis / 1000, "memory": float(cap.memory_bytes)}
            capacity.update({k: float(v) for k, v in cap.scalars.items()})
            held = placement.allocated_by(self.state.tasks_on(node.id))
            allocated = {"cpu": held.cpu_millis / 1000, "memory": float(held.memory_bytes)}
            allocated.update({k: float(v) for k, v in held.scalars.items()})
            view.nodes.append((node.name, node.state == pb.NODE_STATE_READY, capacity, allocated))
        return view

    def _stop_first(self, r: Replacement, new: pb.Task) -> list[Op]:
        """An at-most-one task moves stop first: it retires with desired state SHUTDOWN (its agent
        stops it and reports so; every full assignment asks again) and the new task waits in its
        slot, unplaced, until that report comes (``_retire_replaced``), in one transaction."""
        stopping = _told_to_stop(r.old)
        held = placement.with_reason(new, held_reason(r.old.id))
        return [
            replace(self.state.put(r.key, held), with_next=True),
            self.state.put(self.keys.retiring_task(r.old.id), stopping),
        ]

    def _node_name(self, node_id: str) -> str:
        node = self.state.nodes.get(node_id)
        return node.value.name if node else ""

    def _mark_unreplaced(self, r: Replacement, reason: str) -> list[Op]:
        """A task on a down node that no other node can take: show it as lost, keep it in place
        (if its node comes back it is reclaimed). A task that must leave a node that is up
        (draining, or no longer meeting its constraints) keeps running there: its status stays
        the agent's, and an event says why it stays (once per reason)."""
        if r.retire or r.stop_first:
            message = f"{r.reason}; it keeps running there: no replacement yet: {reason}"
            if self._kept.get(r.old.id) != message:
                self._kept[r.old.id] = message
                node = self.state.nodes.get(r.old.node_id)
                self.events.publish(
                    "task-kept",
                    message,
                    node_id=r.old.node_id,
                    node=node.value.name if node else "",
                    service=r.old.service,
                    task=r.old.id,
                )
            return []
        status = self.state.status_of(r.old.id)
        message = f"{r.reason}; no replacement yet: {reason}"
        if status is not None and status.state == pb.TASK_STATE_LOST and status.message == message:
            return []
        lost = pb.TaskStatus(
            task_id=r.old.id,
            node_id=r.old.node_id,
            state=pb.TASK_STATE_LOST,
            message=message,
            updated_at=self.clock(),
        )
        return [self.state.put(self.keys.status(r.old.id), lost)]
