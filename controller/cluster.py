"""The controller's core: the one writer of desired state, and the reconcile loop.

Every change (API calls, agent registrations and reports, the loop's reconcile and placement
decisions) goes through ``Cluster._commit`` under one lock: ops are guarded by the revisions in the
cache, committed to etcd in batches, folded into the cache only after etcd accepted them (so a
failed call changes nothing), and then the affected agents are told what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from berth.controller import placement
from berth.controller.agents import AgentHub, Session
from berth.controller.errors import (
    AlreadyExistsError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from berth.controller.reconciler import reconcile
from berth.controller.scheduler import schedule
from berth.controller.state import ClusterState, running_count
from berth.controller.store import ConflictError, Delete, Op, Put, Store, StoreError
from berth.controller.validation import SpecError, validate_spec
from berth.proto.berth.v1 import agent_pb2, cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
RESYNC_INTERVAL = 5.0  # the loop also runs this often without a trigger (pending tasks, new nodes)


def _new_task_id(service: str, slot: int) -> str:
    return f"{service}.{slot}.{secrets.token_hex(4)}"


class Cluster:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = store.keys
        self.clock = clock
        self.hub = AgentHub()
        self.state = ClusterState(keys=self.keys)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loaded = await self.store.load()
        self.state = ClusterState.from_loaded(self.keys, loaded)
        log.info(
            "state loaded revision=%d services=%d tasks=%d nodes=%d",
            loaded.revision,
            len(self.state.services),
            len(self.state.tasks),
            len(self.state.nodes),
        )
        self._loop_task = asyncio.create_task(self._run_loop(), name="reconcile-loop")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def trigger(self) -> None:
        self._wake.set()

    # -- the one writer ----------------------------------------------------------------

    async def _commit(self, ops: Sequence[Op]) -> None:
        """Commit ops, fold them into the cache, notify agents. Caller holds the lock."""
        if not ops:
            return
        added: dict[str, list[pb.Task]] = defaultdict(list)
        removed: dict[str, list[str]] = defaultdict(list)
        for op in ops:
            if not op.key.startswith(self.keys.tasks):
                continue
            old_stored = self.state.tasks.get(op.key)
            old = old_stored.value if old_stored else None
            new = op.value if isinstance(op, Put) else None
            assert new is None or isinstance(new, pb.Task)
            if (
                old is not None
                and old.node_id
                and (new is None or new.id != old.id or new.node_id != old.node_id)
            ):
                removed[old.node_id].append(old.id)
            if (
                new is not None
                and new.node_id
                and (old is None or old.id != new.id or old.node_id != new.node_id)
            ):
                added[new.node_id].append(new)
        try:
            revisions = await self.store.commit(ops)
        except ConflictError:
            log.warning("write conflict; reloading state from etcd")
            await self._reload()
            raise UnavailableError("state changed concurrently; retry") from None
        except StoreError as exc:
            raise UnavailableError(str(exc)) from exc
        self.state.apply(ops, revisions)
        for node_id in set(added) | set(removed):
            msg = agent_pb2.ControllerMessage(
                assignments=agent_pb2.Assignments(
                    full=False, tasks=added.get(node_id, []), removed=removed.get(node_id, [])
                )
            )
            self.hub.send(node_id, msg)

    async def _reload(self) -> None:
        try:
            loaded = await self.store.load()
        except StoreError as exc:
            log.error("reload failed: %s", exc)
            return
        self.state = ClusterState.from_loaded(self.keys, loaded)

    # -- services ----------------------------------------------------------------------

    @staticmethod
    def _validate(spec: pb.ServiceSpec) -> None:
        try:
            validate_spec(spec)
        except SpecError as exc:
            raise InvalidError(str(exc)) from exc

    async def create_service(self, spec: pb.ServiceSpec) -> pb.Service:
        self._validate(spec)
        async with self._lock:
            if spec.name in self.state.services:
                raise AlreadyExistsError(
                    f"name: service {spec.name!r} already exists; use `berth service apply` to change it "
                    "or choose another name"
                )
            service = await self._put_service(spec, previous=None)
        self.trigger()
        return service

    async def apply_service(self, spec: pb.ServiceSpec) -> tuple[pb.Service, bool, bool]:
        """Create or update; returns (service, created, changed)."""
        self._validate(spec)
        async with self._lock:
            stored = self.state.services.get(spec.name)
            if stored is not None and stored.value.spec == spec:
                return stored.value, False, False
            service = await self._put_service(spec, previous=stored.value if stored else None)
        self.trigger()
        return service, stored is None, True

    async def scale_service(self, name: str, replicas: int) -> pb.Service:
        async with self._lock:
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
        key = self.keys.service(spec.name)
        await self._commit([Put(key, service, self.state.revision_of(key))])
        log.info(
            "service stored service=%s generation=%d replicas=%d",
            spec.name,
            service.generation,
            spec.replicas,
        )
        return service

    async def remove_service(self, name: str) -> None:
        async with self._lock:
            if name not in self.state.services:
                raise NotFoundError(f"service {name!r} not found; `berth service ls` lists services")
            ops: list[Op] = [self.state.guarded(Delete, self.keys.service(name))]
            for key, task in self.state.tasks_of(name):
                ops.append(self.state.guarded(Delete, key))
                if task.id in self.state.statuses:
                    ops.append(self.state.guarded(Delete, self.keys.status(task.id)))
            await self._commit(ops)
        log.info("service removed service=%s", name)

    # -- views -------------------------------------------------------------------------

    def service_view(self, name: str) -> cluster_pb2.ServiceView:
        stored = self.state.services.get(name)
        if stored is None:
            raise NotFoundError(f"service {name!r} not found; `berth service ls` lists services")
        tasks = [t for _, t in self.state.tasks_of(name)]
        return cluster_pb2.ServiceView(
            service=stored.value,
            running=running_count(self.state, tasks),
            pending=sum(1 for t in tasks if not t.node_id),
        )

    def service_views(self) -> list[cluster_pb2.ServiceView]:
        return [self.service_view(name) for name in sorted(self.state.services)]

    def task_views(self, service: str = "") -> list[cluster_pb2.TaskView]:
        if service and service not in self.state.services:
            raise NotFoundError(f"service {service!r} not found; `berth service ls` lists services")
        names = [service] if service else sorted(self.state.services)
        views = []
        for name in names:
            for _, task in self.state.tasks_of(name):
                view = cluster_pb2.TaskView(task=task)
                status = self.state.status_of(task.id)
                if status is not None:
                    view.status.CopyFrom(status)
                node = self.state.nodes.get(task.node_id)
                if node is not None:
                    view.node_name = node.value.name
                    view.node_address = node.value.address
                views.append(view)
        return views

    def node_views(self) -> list[cluster_pb2.NodeView]:
        by_node = self.state.tasks_by_node()
        views = []
        for stored in sorted(self.state.nodes.values(), key=lambda s: s.value.name):
            tasks = by_node.get(stored.value.id, [])
            views.append(
                cluster_pb2.NodeView(
                    node=stored.value,
                    allocated=placement.to_pb_resources(placement.allocated_by(tasks)),
                    tasks=len(tasks),
                )
            )
        return views

    # -- agents ------------------------------------------------------------------------

    async def register(self, reg: agent_pb2.Register) -> tuple[Session, list[pb.Task]]:
        """Record the node as ready and attach its stream; returns the session and its full assignment."""
        if not reg.node_id or not reg.name:
            raise InvalidError("register: node_id and name are required")
        now = self.clock()
        async with self._lock:
            ops: list[Op] = []
            same_name = self.state.node_by_name(reg.name)
            if same_name is not None and same_name.id != reg.node_id:
                if self.hub.connected(same_name.id):
                    raise AlreadyExistsError(
                        f"a connected node is already named {reg.name!r}; give this agent another --name"
                    )
                # the host was re-created with a fresh state dir: the old record goes, its tasks
                # go back to pending through the reconciler
                ops.append(self.state.guarded(Delete, self.keys.node(same_name.id)))
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
            if previous is not None:
                node.availability = previous.value.availability or pb.NODE_AVAILABILITY_ACTIVE
                node.registered_at = previous.value.registered_at
                if previous.value.state == pb.NODE_STATE_READY:
                    node.state_changed_at = previous.value.state_changed_at
            if previous is None or previous.value != node:
                ops.append(
                    Put(
                        self.keys.node(reg.node_id), node, self.state.revision_of(self.keys.node(reg.node_id))
                    )
                )
            await self._commit(ops)
            session = self.hub.attach(reg.node_id)
            assigned = self.state.tasks_by_node().get(reg.node_id, [])
        log.info(
            "node registered node=%s name=%s address=%s tasks=%d",
            reg.node_id,
            reg.name,
            reg.address,
            len(assigned),
        )
        self.trigger()
        return session, assigned

    async def disconnect(self, session: Session) -> None:
        """The stream closed: mark the node down unless a newer stream replaced it."""
        async with self._lock:
            if not self.hub.detach(session):
                return
            stored = self.state.nodes.get(session.node_id)
            if stored is None or stored.value.state == pb.NODE_STATE_DOWN:
                return
            node = pb.Node()
            node.CopyFrom(stored.value)
            node.state = pb.NODE_STATE_DOWN
            node.state_changed_at = self.clock()
            try:
                await self._commit([Put(self.keys.node(node.id), node, stored.mod_revision)])
            except UnavailableError as exc:
                log.warning("could not mark node down node=%s: %s", node.id, exc)
                return
        log.info("node disconnected node=%s name=%s", node.id, node.name)

    async def record_statuses(self, session: Session, statuses: Sequence[pb.TaskStatus]) -> None:
        """Store what the agent observed, for tasks that still exist; written on change only."""
        async with self._lock:
            if not self.hub.is_current(session):
                return
            ops: list[Op] = []
            for status in statuses:
                found = self.state.task_by_id(status.task_id)
                if found is None:
                    continue
                current = self.state.status_of(status.task_id)
                if current == status:
                    continue
                ops.append(
                    Put(
                        self.keys.status(status.task_id),
                        status,
                        self.state.revision_of(self.keys.status(status.task_id)),
                    )
                )
            await self._commit(ops)

    # -- the loop ----------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=RESYNC_INTERVAL)
            self._wake.clear()
            try:
                await self.reconcile_once()
            except UnavailableError as exc:
                log.warning("reconcile deferred: %s", exc)
                await asyncio.sleep(0.5)
                self.trigger()
            except Exception:
                log.exception("reconcile failed")
                await asyncio.sleep(1.0)

    async def reconcile_once(self) -> None:
        async with self._lock:
            now = self.clock()
            result = reconcile(
                services={name: s.value for name, s in self.state.services.items()},
                tasks={key: s.value for key, s in self.state.tasks.items()},
                node_ids=set(self.state.nodes),
                task_key=self.keys.task,
                new_id=_new_task_id,
                now=now,
            )
            ops: list[Op] = []
            for key, task in result.put:
                old = self.state.tasks.get(key)
                ops.append(Put(key, task, old.mod_revision if old else 0))
                if old is not None and old.value.id != task.id and old.value.id in self.state.statuses:
                    ops.append(self.state.guarded(Delete, self.keys.status(old.value.id)))
            for key in result.delete:
                old = self.state.tasks[key]
                ops.append(Delete(key, old.mod_revision))
                if old.value.id in self.state.statuses:
                    ops.append(self.state.guarded(Delete, self.keys.status(old.value.id)))
            await self._commit(ops)
            if result.put or result.delete:
                log.info("reconciled created_or_replaced=%d removed=%d", len(result.put), len(result.delete))
            await self._schedule_pending(now)

    async def _schedule_pending(self, now: float) -> None:
        pending = {
            s.value.id: (key, s.value)
            for key, s in sorted(
                self.state.tasks.items(), key=lambda kv: (kv[1].value.service, kv[1].value.slot)
            )
            if not s.value.node_id and s.value.desired_state == pb.TASK_STATE_RUNNING
        }
        if not pending:
            return
        by_node = self.state.tasks_by_node()
        nodes = [
            placement.node_info(s.value, by_node.get(nid, [])) for nid, s in sorted(self.state.nodes.items())
        ]
        plan = schedule(nodes, [placement.task_request(t) for _, t in pending.values()])
        updates = placement.apply_plan(plan, pending, now)
        ops: list[Op] = [Put(key, task, self.state.revision_of(key)) for key, task in updates]
        await self._commit(ops)
        for p in plan.placements:
            log.debug("task placed task=%s node=%s", p.task_id, p.node_id)
        for w in plan.pending:
            log.debug("task pending task=%s reason=%s", w.task_id, w.reason)
