"""The fast path for runs of identical replicas: rank once, then place one replica after another.

Most batches are many replicas of one service in consecutive slots: tasks that differ only in
``task_id`` and ``slot``. For such a run, :func:`berth.controller.scheduler.schedule` could run the
filters and rankers over every node for every replica; this module gives the same answer (the
same node for every replica, the same host ports, the same pending reasons) in far less time.

Why it is exact. For one task the per-task path picks, among the feasible nodes, the
lexicographic minimum of ``(load key, own replicas, tie hash, row)`` (:func:`.scoring.choose`
narrows ranker by ranker and returns the first row left). Within a run of one shape, placing a
replica on node ``r`` changes only row ``r``:

* feasibility: ready, availability and constraints never change; per-node limit, fixed host ports
  and free cpu / memory / scalars change only on ``r``, and only from feasible to infeasible
  (placements only add), so a node infeasible at the start of the run stays so;
* the load key: ``BINPACK`` scores ``allocated - own x request``, which placing one more own
  replica (``+request``, ``+1``) leaves as it was; ``SPREAD`` gets worse (or stays) on ``r``
  only. Scores are per node: the one thing that couples nodes, ``BINPACK`` subtracting ``own`` only
  when some candidate holds a replica, changes nothing when no candidate has a negative
  allocation in a requested dimension (checked, else no fast path);
* own replicas: ``+1`` on ``r``.

So ``r``'s ``(load key, own)`` gets strictly worse and every other node's stays. The index keeps
the candidates sorted by ``(load key, own, row)`` once per run, plus the nodes placed on in this
run under their new keys. Each replica goes to the group of nodes that share the best key: the
row of least tie hash for its slot, the lowest row on equal hashes (equal hashes mean equal node
ids). The tie hash depends on the slot, so it cannot be sorted once; but as every placement
moves its node out of the group and no node moves in, the next ``min(group size, replicas
left)`` replicas all go to this group, one node each, so their tie keys over the group are
computed as one matrix (in batches of bounded size) and a node taken is masked out for the later
slots. When the group is used up the next best key's group (sorted candidates and moved nodes of
that key, merged by row) takes over; when none is left the per-task path answers the rest of the
run, with the same pending reason for each (and remembers it, as it always does).

Not handled (the caller uses the per-task path): label spread (placing changes the counts of a
whole domain), dynamic host ports, and negative allocations as above. If a node's new key were
ever not worse than the group's (it cannot be, see above), :meth:`ReplicaIndex.update` says so
and the caller goes back to the per-task path for the rest of the run instead of trusting the
index.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from . import scoring
from .model import HashArray, IntArray, NodeTable, Strategy, TaskRequest, mix64
from .ports import PortBook, dynamic_demand, fixed_keys

MIN_RUN = 4
"""Shorter runs are placed task by task: sorting the candidates costs a few tasks' worth."""

GroupKey = tuple[float, int]
"""``(load key, own replicas)`` of a node; lower is better."""


def replica_shape(task: TaskRequest) -> tuple[object, ...]:
    """Everything but ``task_id`` and ``slot``: tasks of equal shape are identical replicas."""
    return (
        task.service,
        task.resources,
        task.ports,
        task.constraints,
        task.max_per_node,
        task.spread,
        task.strategy,
    )


def run_end(tasks: Sequence[TaskRequest], start: int) -> int:
    """The end (exclusive) of the run of tasks shaped like ``tasks[start]``."""
    shape = replica_shape(tasks[start])
    end = start + 1
    while end < len(tasks) and replica_shape(tasks[end]) == shape:
        end += 1
    return end


def eligible(task: TaskRequest) -> bool:
    """Whether the fast path handles this shape at all (before looking at the nodes)."""
    return not task.spread and not dynamic_demand(task.ports)


class ReplicaIndex:
    """The feasible nodes of one run, grouped by ``(load key, own replicas)``, best group first.

    The replicas of the run (their ``slots``) are taken in order: :meth:`take` says where the next
    one goes, :meth:`update` files that node again once the replica is committed there.
    """

    def __init__(
        self,
        table: NodeTable,
        ports: PortBook,
        task: TaskRequest,
        request: IntArray,
        rows: IntArray,
        slots: Sequence[int],
    ) -> None:
        self._table = table
        self._ports = ports
        self._task = task
        self._request = request
        self._requested = [(c, int(request[c])) for c in np.flatnonzero(request > 0).tolist()]
        self._fixed = fixed_keys(task.ports)
        self._counts = table.service_counts(task.service)
        self._slots = slots
        self._taken = 0
        load = -np.round(scoring.load_scores(table, rows, request, task), scoring.SCORE_DECIMALS)
        own = self._counts[rows]
        order = np.lexsort((rows, own, load))
        self._rows: IntArray = rows[order]
        self._load = load[order]
        self._own = own[order]
        changes = (self._load[1:] != self._load[:-1]) | (self._own[1:] != self._own[:-1])
        self._bounds: list[int] = [0, *(np.flatnonzero(changes) + 1).tolist(), int(rows.size)]
        self._next = 0
        """Index into ``_bounds`` of the next untouched group of the sorted candidates."""
        self._moved: dict[GroupKey, list[int]] = {}
        """Nodes placed on in this run (and still feasible), by their new key."""
        self._heap: list[GroupKey] = []
        self._key: GroupKey = (0.0, 0)
        self._group: IntArray = rows[:0]
        """The best group: feasible nodes of key ``_key``, ascending rows (incl. ``_removed``)."""
        self._removed: list[int] = []
        """Positions in ``_group`` taken by the current batch."""
        self._ties: HashArray = np.zeros((0, 0), dtype=np.uint64)
        """The current batch: tie keys of the group's nodes (columns) for its slots (rows)."""
        self._batch = 0
        """Row of ``_ties`` for the next replica."""

    @classmethod
    def start(
        cls,
        table: NodeTable,
        ports: PortBook,
        task: TaskRequest,
        request: IntArray,
        rows: IntArray,
        slots: Sequence[int],
    ) -> ReplicaIndex | None:
        """The index over the feasible ``rows`` (non-empty) for replicas in ``slots``, or None
        when the fast path would not be exact for them."""
        if task.strategy is not Strategy.SPREAD:
            requested = np.flatnonzero(request > 0)
            if (table.allocated[requested][:, rows] < 0).any():
                return None
        return cls(table, ports, task, request, rows, slots)

    def take(self) -> int:
        """The node the next replica goes to, or -1 if none is feasible. Call :meth:`update`
        once it is committed there.

        Every replica goes to the current group until it is used up (placing makes a node's key
        worse, never better), so the tie keys of the group for the next few slots are computed
        in one batch; a node taken in the batch is masked out for the later slots.
        """
        if self._batch == self._ties.shape[0] and not self._new_batch():
            return -1
        ties = self._ties[self._batch]
        self._batch += 1
        self._taken += 1
        position = int(ties.argmin())  # the first (lowest row) of equal keys
        if ties[position] == _TAKEN and position in self._removed:  # every key left is _TAKEN
            position = next(p for p in np.flatnonzero(ties == _TAKEN).tolist() if p not in self._removed)
        self._removed.append(position)
        self._ties[self._batch :, position] = _TAKEN
        return int(self._group[position])

    def update(self, row: int) -> bool:
        """File ``row`` under its key after a replica was committed there; False when the index
        can no longer be trusted (the caller must go on task by task)."""
        if not self._feasible(row):
            return True
        load = self._key[0]
        if self._task.strategy is Strategy.SPREAD:
            scores = scoring.load_scores(self._table, np.array([row]), self._request, self._task)
            load = float(-np.round(scores, scoring.SCORE_DECIMALS)[0])
        key = (load, int(self._counts[row]))
        if key <= self._key:
            return False
        moved = self._moved.get(key)
        if moved is None:
            self._moved[key] = [row]
            heapq.heappush(self._heap, key)
        else:
            moved.append(row)
        return True

    def _feasible(self, row: int) -> bool:
        """Whether ``row`` still passes the checks a placement can change."""
        limit = self._task.max_per_node
        if limit > 0 and self._counts[row] >= limit:
            return False
        if self._fixed and any(self._ports.is_used(row, key) for key in self._fixed):
            return False  # (a task asking for a fixed port twice had no candidate to begin with)
        capacity, allocated = self._table.capacity, self._table.allocated
        return all(capacity[c, row] - allocated[c, row] >= amount for c, amount in self._requested)

    def _new_batch(self) -> bool:
        """Tie keys for the next slots over what is left of the group (or the next best group);
        False when no node is left."""
        if self._removed:
            kept = np.ones(self._group.size, dtype=np.bool_)
            kept[self._removed] = False
            self._group = self._group[kept]
            self._removed = []
        if self._group.size == 0 and not self._activate():
            return False
        size = int(self._group.size)
        count = max(1, min(size, len(self._slots) - self._taken, _BATCH_KEYS // size))
        if size == 1:
            self._ties = np.zeros((count, 1), dtype=np.uint64)
        else:
            service = self._task.service
            slot_hashes = [
                scoring.slot_hash(self._table, service, slot) for slot in self._slots[self._taken :][:count]
            ]
            node_hashes = self._table.node_hashes[self._group]
            self._ties = mix64(
                node_hashes[np.newaxis, :] ^ np.array(slot_hashes, dtype=np.uint64)[:, np.newaxis]
            )
        self._batch = 0
        return True

    def _activate(self) -> bool:
        """Make the best remaining group the current one; False when no node is left."""
        candidates: list[GroupKey] = []
        if self._next + 1 < len(self._bounds):
            first = self._bounds[self._next]
            candidates.append((float(self._load[first]), int(self._own[first])))
        if self._heap:
            candidates.append(self._heap[0])
        if not candidates:
            return False
        key = min(candidates)
        parts: list[IntArray] = []
        if self._next + 1 < len(self._bounds) and candidates[0] == key:
            parts.append(self._rows[self._bounds[self._next] : self._bounds[self._next + 1]])
            self._next += 1
        if self._heap and self._heap[0] == key:
            heapq.heappop(self._heap)
            parts.append(np.array(self._moved.pop(key), dtype=np.int64))
        self._group = np.sort(parts[0] if len(parts) == 1 else np.concatenate(parts))
        self._key = key
        return True


_TAKEN = np.uint64(np.iinfo(np.uint64).max)
"""The tie key masking a node already taken in the current batch (a real key may equal it)."""

_BATCH_KEYS = 1 << 16
"""Tie keys computed per batch at most (slots x nodes of the group), bounding its memory."""
