"""The controller's in-memory view of etcd, rebuilt by ``Store.load`` at start and kept in step
by applying every committed write (the controller is the only writer of these keys)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from berth.controller.store import Delete, Keys, Loaded, Op, Put, Stored
from berth.proto.berth.v1 import types_pb2 as pb


@dataclass(slots=True)
class ClusterState:
    keys: Keys
    services: dict[str, Stored[pb.Service]] = field(default_factory=dict)
    tasks: dict[str, Stored[pb.Task]] = field(default_factory=dict)  # by task key
    statuses: dict[str, Stored[pb.TaskStatus]] = field(default_factory=dict)  # by task id
    nodes: dict[str, Stored[pb.Node]] = field(default_factory=dict)  # by node id
    task_key_by_id: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_key_by_id = {s.value.id: key for key, s in self.tasks.items()}

    @classmethod
    def from_loaded(cls, keys: Keys, loaded: Loaded) -> ClusterState:
        return cls(
            keys=keys,
            services=loaded.services,
            tasks=loaded.tasks,
            statuses=loaded.statuses,
            nodes=loaded.nodes,
        )

    def revision_of(self, key: str) -> int:
        """The cached mod_revision of a key, 0 when absent (the guard for 'must not exist')."""
        k = self.keys
        if key.startswith(k.services):
            s = self.services.get(key.removeprefix(k.services))
        elif key.startswith(k.tasks):
            s = self.tasks.get(key)  # type: ignore[assignment]
        elif key.startswith(k.statuses):
            s = self.statuses.get(key.removeprefix(k.statuses))  # type: ignore[assignment]
        elif key.startswith(k.nodes):
            s = self.nodes.get(key.removeprefix(k.nodes))  # type: ignore[assignment]
        else:
            s = None
        return s.mod_revision if s else 0

    def guarded(self, op_type: type[Put] | type[Delete], key: str, value: object = None) -> Op:
        """Build an op guarded by the revision this cache holds for ``key``."""
        if op_type is Put:
            return Put(key, value, self.revision_of(key))  # type: ignore[arg-type]
        return Delete(key, self.revision_of(key))

    def apply(self, ops: Sequence[Op], revisions: dict[str, int]) -> None:
        """Fold committed ops into the cache."""
        k = self.keys
        for op in ops:
            rev = revisions[op.key]
            if op.key.startswith(k.services):
                name = op.key.removeprefix(k.services)
                _set(self.services, name, op, rev)
            elif op.key.startswith(k.tasks):
                old = self.tasks.get(op.key)
                if old is not None:
                    self.task_key_by_id.pop(old.value.id, None)
                _set(self.tasks, op.key, op, rev)
                if isinstance(op, Put):
                    self.task_key_by_id[op.value.id] = op.key  # type: ignore[attr-defined]
            elif op.key.startswith(k.statuses):
                _set(self.statuses, op.key.removeprefix(k.statuses), op, rev)
            elif op.key.startswith(k.nodes):
                _set(self.nodes, op.key.removeprefix(k.nodes), op, rev)

    # -- queries ------------------------------------------------------------------------

    def tasks_of(self, service: str) -> list[tuple[str, pb.Task]]:
        prefix = f"{self.keys.tasks}{service}/"
        found = [(key, s.value) for key, s in self.tasks.items() if key.startswith(prefix)]
        return sorted(found, key=lambda kt: kt[1].slot)

    def tasks_by_node(self) -> dict[str, list[pb.Task]]:
        by_node: dict[str, list[pb.Task]] = defaultdict(list)
        for s in self.tasks.values():
            if s.value.node_id:
                by_node[s.value.node_id].append(s.value)
        return by_node

    def task_by_id(self, task_id: str) -> tuple[str, pb.Task] | None:
        key = self.task_key_by_id.get(task_id)
        return (key, self.tasks[key].value) if key is not None else None

    def node_by_name(self, name: str) -> pb.Node | None:
        for s in self.nodes.values():
            if s.value.name == name:
                return s.value
        return None

    def status_of(self, task_id: str) -> pb.TaskStatus | None:
        s = self.statuses.get(task_id)
        return s.value if s else None


def _set(table: dict[str, Stored[object]] | dict, key: str, op: Op, rev: int) -> None:  # type: ignore[type-arg]
    if isinstance(op, Put):
        table[key] = Stored(op.value, rev)
    else:
        table.pop(key, None)


def running_count(state: ClusterState, tasks: Iterable[pb.Task]) -> int:
    n = 0
    for task in tasks:
        status = state.status_of(task.id)
        if status is not None and status.state == pb.TASK_STATE_RUNNING and status.node_id == task.node_id:
            n += 1
    return n
