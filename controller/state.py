"""The controller's in-memory view of etcd, rebuilt by ``Store.load`` at start and kept in step
by applying every committed write (the controller is the only writer of these keys)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from berth.controller.store import Delete, Keys, Loaded, Op, Put, Stored
from berth.proto.berth.v1 import types_pb2 as pb


@dataclass(slots=True)
class ClusterState:
    keys: Keys
    services: dict[str, Stored[pb.Service]] = field(default_factory=dict)
    tasks: dict[str, Stored[pb.Task]] = field(default_factory=dict)  # by task key
    statuses: dict[str, Stored[pb.TaskStatus]] = field(default_factory=dict)  # by task id
    nodes: dict[str, Stored[pb.Node]] = field(default_factory=dict)  # by node id
    retiring: dict[str, Stored[pb.Task]] = field(default_factory=dict)  # by task id
    task_key_by_id: dict[str, str] = field(default_factory=dict)
    on_node: dict[str, dict[str, pb.Task]] = field(default_factory=dict)  # node id -> task id -> task
    node_id_by_name: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_key_by_id = {s.value.id: key for key, s in self.tasks.items()}
        self.node_id_by_name = {s.value.name: node_id for node_id, s in self.nodes.items()}
        self.on_node = defaultdict(dict)
        for stored in (*self.tasks.values(), *self.retiring.values()):
            self._index(stored.value)

    def _index(self, task: pb.Task) -> None:
        if task.node_id:
            self.on_node[task.node_id][task.id] = task

    def _unindex(self, task: pb.Task, table: dict[str, Any]) -> None:
        if task.node_id and not self._held_elsewhere(task, table):
            held = self.on_node.get(task.node_id)
            if held is not None:
                held.pop(task.id, None)
                if not held:
                    del self.on_node[task.node_id]

    def _held_elsewhere(self, task: pb.Task, table: dict[str, Any]) -> bool:
        """Whether the other table (slots or retiring) still places this task on its node: a
        drained task is under both keys for a moment. The controller commits the two writes in
        one transaction, slot first; this keeps the index right in the other order too."""
        if table is self.tasks:
            other = self.retiring.get(task.id)
        else:
            key = self.task_key_by_id.get(task.id)
            other = self.tasks.get(key) if key is not None else None
        return other is not None and other.value.node_id == task.node_id

    @classmethod
    def from_loaded(cls, keys: Keys, loaded: Loaded) -> ClusterState:
        return cls(
            keys=keys,
            services=loaded.services,
            tasks=loaded.tasks,
            statuses=loaded.statuses,
            nodes=loaded.nodes,
            retiring=loaded.retiring,
        )

    def _table(self, key: str) -> tuple[dict[str, Any], str] | None:
        """The cache table holding ``key`` and the key's name inside it."""
        k = self.keys
        if key.startswith(k.tasks):  # the most written first
            return self.tasks, key
        if key.startswith(k.statuses):
            return self.statuses, key[len(k.statuses) :]
        if key.startswith(k.services):
            return self.services, key.removeprefix(k.services)
        if key.startswith(k.nodes):
            return self.nodes, key.removeprefix(k.nodes)
        if key.startswith(k.retiring):
            return self.retiring, key.removeprefix(k.retiring)
        return None

    def revision_of(self, key: str) -> int:
        """The cached mod_revision of a key, 0 when absent (the guard for 'must not exist')."""
        found = self._table(key)
        stored = found[0].get(found[1]) if found else None
        return stored.mod_revision if stored else 0

    def value_of(self, key: str) -> Any:
        found = self._table(key)
        stored = found[0].get(found[1]) if found else None
        return stored.value if stored else None

    def put(self, key: str, value: Any) -> Put:
        """A put guarded by the revision this cache holds for ``key``."""
        return Put(key, value, self.revision_of(key))

    def delete(self, key: str) -> Delete:
        return Delete(key, self.revision_of(key))

    def apply(self, ops: Sequence[Op], revisions: dict[str, int]) -> None:
        """Fold committed ops into the cache."""
        for op in ops:
            found = self._table(op.key)
            if found is None:
                continue
            table, name = found
            if table is self.nodes:
                old_node = table.get(name)
                if old_node is not None and self.node_id_by_name.get(old_node.value.name) == name:
                    del self.node_id_by_name[old_node.value.name]
                if isinstance(op, Put):
                    self.node_id_by_name[op.value.name] = name  # type: ignore[attr-defined]
            if table is self.tasks or table is self.retiring:
                old = table.get(name)
                if old is not None:
                    self._unindex(old.value, table)
                    if table is self.tasks:
                        self.task_key_by_id.pop(old.value.id, None)
                if isinstance(op, Put):
                    self._index(op.value)  # type: ignore[arg-type]
                    if table is self.tasks:
                        self.task_key_by_id[op.value.id] = op.key  # type: ignore[attr-defined]
            if isinstance(op, Put):
                table[name] = Stored(op.value, revisions[op.key])
            else:
                table.pop(name, None)

    # -- queries ------------------------------------------------------------------------

    def tasks_of(self, service: str) -> list[tuple[str, pb.Task]]:
        prefix = f"{self.keys.tasks}{service}/"
        found = [(key, s.value) for key, s in self.tasks.items() if key.startswith(prefix)]
        return sorted(found, key=lambda kt: kt[1].slot)

    def tasks_by_node(self) -> dict[str, list[pb.Task]]:
        """What each node should run: slot tasks placed there plus retiring tasks still there."""
        return {node_id: list(held.values()) for node_id, held in self.on_node.items()}

    def tasks_on(self, node_id: str) -> list[pb.Task]:
        return list(self.on_node.get(node_id, {}).values())

    def task_by_id(self, task_id: str) -> pb.Task | None:
        key = self.task_key_by_id.get(task_id)
        if key is not None:
            return self.tasks[key].value
        retiring = self.retiring.get(task_id)
        return retiring.value if retiring else None

    def node_by_name(self, name: str) -> pb.Node | None:
        node_id = self.node_id_by_name.get(name)
        stored = self.nodes.get(node_id) if node_id is not None else None
        return stored.value if stored else None

    def node_by_ref(self, ref: str) -> pb.Node | None:
        stored = self.nodes.get(ref)
        return stored.value if stored else self.node_by_name(ref)

    def status_of(self, task_id: str) -> pb.TaskStatus | None:
        s = self.statuses.get(task_id)
        return s.value if s else None

    def is_running(self, task: pb.Task) -> bool:
        status = self.status_of(task.id)
        return status is not None and status.state == pb.TASK_STATE_RUNNING and status.node_id == task.node_id
