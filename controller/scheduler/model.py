"""Domain values the scheduler works on.

The scheduler never sees protobuf messages: the controller converts its stored ``Node`` and
``Task`` messages into these frozen dataclasses (one codec module at the edge), calls
:func:`berth.controller.scheduler.schedule`, and converts the returned :class:`Plan` back.

Mappings held by these values are treated as read-only; nothing in the scheduler mutates them.

The module ends with :class:`NodeTable`, the scheduler's private, vectorised working copy of the
nodes (not re-exported).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import numpy as np
import numpy.typing as npt


def _empty_mapping() -> Mapping[str, int]:
    return MappingProxyType({})


def _empty_labels() -> Mapping[str, str]:
    return MappingProxyType({})


class Availability(Enum):
    """What an operator allows on a node (``berth node drain|activate``)."""

    ACTIVE = "active"
    """New tasks may be placed here."""
    PAUSE = "pause"
    """Running tasks stay; no new tasks are placed."""
    DRAIN = "drain"
    """Running tasks are moved away; no new tasks are placed."""


class Strategy(Enum):
    """How a service's tasks rank the feasible nodes by their load."""

    BINPACK = "binpack"
    """Best fit: the node the task fills most tightly, so fewer hosts carry the work (default)."""
    SPREAD = "spread"
    """Emptiest first: the node with the lowest mean ``(allocated + request) / capacity``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """A request (per task), a capacity or an allocation (per node).

    A scalar that is absent counts as 0.
    """

    cpu_millis: int = 0
    """CPU in thousandths of a core (1000 = one core)."""
    memory_bytes: int = 0
    """Memory in bytes."""
    scalars: Mapping[str, int] = field(default_factory=_empty_mapping)
    """Named resources an agent declares (``gpu``, ``disk``, ...)."""

    def add(self, other: Resources) -> Resources:
        """Return the sum of ``self`` and ``other``, dimension by dimension."""
        return Resources(
            cpu_millis=self.cpu_millis + other.cpu_millis,
            memory_bytes=self.memory_bytes + other.memory_bytes,
            scalars=_combine(self.scalars, other.scalars, 1),
        )

    def sub(self, other: Resources) -> Resources:
        """Return ``self`` minus ``other``, dimension by dimension (may go negative)."""
        return Resources(
            cpu_millis=self.cpu_millis - other.cpu_millis,
            memory_bytes=self.memory_bytes - other.memory_bytes,
            scalars=_combine(self.scalars, other.scalars, -1),
        )

    def fits(self, request: Resources) -> bool:
        """True when ``request`` fits inside ``self`` read as free capacity, in every dimension."""
        if request.cpu_millis > self.cpu_millis or request.memory_bytes > self.memory_bytes:
            return False
        return all(amount <= self.scalars.get(name, 0) for name, amount in request.scalars.items())


def _combine(left: Mapping[str, int], right: Mapping[str, int], sign: int) -> Mapping[str, int]:
    names = sorted(set(left) | set(right))
    return MappingProxyType({name: left.get(name, 0) + sign * right.get(name, 0) for name in names})


@dataclass(frozen=True, slots=True, kw_only=True)
class PortRequest:
    """A container port to publish on the host."""

    container_port: int
    host_port: int = 0
    """A fixed host port, or 0 for the lowest free port in the dynamic range."""
    protocol: str = "tcp"
    """``tcp`` or ``udp`` (an empty string is read as ``tcp``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Constraint:
    """Placement restricted by node label ``key``.

    ``==`` / ``!=``: the label is / is not ``value``; ``in``: the label is one of ``values``.
    A node without the label fails ``==`` and ``in`` and passes ``!=``. Any other op fails
    everywhere (validation keeps such specs out).
    """

    key: str
    op: str
    value: str = ""
    """The label value compared with by ``==`` and ``!=`` (ignored by ``in``)."""
    values: tuple[str, ...] = ()
    """The label values accepted by ``in`` (ignored by ``==`` and ``!=``)."""

    def __str__(self) -> str:
        if self.op == "in":
            return f"{self.key} in ({','.join(self.values)})"
        return f"{self.key}{self.op}{self.value}"

    def holds(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` satisfies the constraint (the rule the masks apply)."""
        value = labels.get(self.key)
        if self.op == "in":
            return value in self.values
        if self.op == "==":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node as the scheduler sees it in a snapshot."""

    id: str
    name: str = ""
    capacity: Resources = field(default_factory=Resources)
    allocated: Resources = field(default_factory=Resources)
    """Sum of the requests of the tasks already assigned here."""
    labels: Mapping[str, str] = field(default_factory=_empty_labels)
    ready: bool = True
    availability: Availability = Availability.ACTIVE
    used_ports: frozenset[tuple[str, int]] = frozenset()
    """``(protocol, host_port)`` pairs already taken on this node."""
    service_counts: Mapping[str, int] = field(default_factory=_empty_mapping)
    """Replicas of each service already on this node."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequest:
    """One task (a slot of a service) that needs a node."""

    task_id: str
    service: str
    slot: int = 0
    """The slot's number: it orders a service's replicas, and never decides between nodes (the
    tie-break is per service, see :mod:`.scoring`)."""
    resources: Resources = field(default_factory=Resources)
    ports: tuple[PortRequest, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    max_per_node: int = 0
    """At most this many replicas of ``service`` on one node (0 = no limit)."""
    spread: tuple[str, ...] = ()
    """Node label keys whose values the service's replicas are spread evenly across, in order of
    precedence (a node without the label is in the domain ``""``)."""
    strategy: Strategy = Strategy.BINPACK
    """How feasible nodes are ranked by load."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """A task assigned to a node, with the host ports allocated for it."""

    task_id: str
    node_id: str
    ports: tuple[tuple[int, int, str], ...] = ()
    """``(container_port, host_port, protocol)`` for every requested port, in request order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """A task no node can take now, and why."""

    task_id: str
    reason: str
    """Human text, e.g. ``0/5 nodes available: 3 insufficient memory, 2 constraint env==prod not met``."""
    rejections: Mapping[str, int] = field(default_factory=_empty_mapping)
    """Reason code -> number of nodes rejected for it (first failing filter only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeVerdict:
    """What :func:`berth.controller.scheduler.explain` says about one node for one task."""

    node_id: str
    feasible: bool
    reason: str = ""
    """The first failing filter's reason code (as counted in :attr:`Pending.rejections`), or ``""``."""
    score: float = 0.0
    """The load score the task's strategy ranks by (higher is better; 0.0 when not feasible)."""
    rank: int = 0
    """1 for the node :func:`schedule` would choose, 2 for the next, ...; 0 when not feasible."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The scheduler's answer: placements and pending tasks, each in task order."""

    placements: tuple[Placement, ...] = ()
    pending: tuple[Pending, ...] = ()


# --- The working copy -------------------------------------------------------------------------
#
# Inside one schedule() call the nodes live in a NodeTable: one row per node, one column per
# resource dimension, so that feasibility and scoring for a task over every node are array
# arithmetic. It is private to the scheduler and mutated only through NodeTable.commit() and
# its relatives (commit_rows, uncommit, uncommit_rows).

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
HashArray = npt.NDArray[np.uint64]

CPU_DIM = 0
MEMORY_DIM = 1
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def stable_hash(seed: int, text: str) -> int:
    """A 64-bit hash of ``(seed, text)`` that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def mix64(values: HashArray) -> HashArray:
    """The splitmix64 finaliser, applied element-wise (wrapping uint64 arithmetic)."""
    z = (values ^ (values >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


class NodeTable:
    """The nodes of one schedule() call as arrays, updated as tasks are placed.

    Resource matrices are dimension-major (``[dimension, node]``) so that one dimension over all
    nodes is a contiguous row.
    """

    def __init__(self, nodes: Sequence[NodeInfo], scalar_names: Sequence[str], *, seed: int) -> None:
        self.ids: tuple[str, ...] = tuple(node.id for node in nodes)
        self.size = len(nodes)
        self.dims: tuple[str, ...] = ("cpu", "memory", *scalar_names)
        self._scalar_columns = {name: i for i, name in enumerate(scalar_names, start=2)}
        self.capacity: IntArray = self._matrix([node.capacity for node in nodes])
        """Capacity, one row per dimension, one column per node."""
        self.allocated: IntArray = self._matrix([node.allocated for node in nodes])
        """Allocation, one row per dimension, one column per node; grows with commit()."""
        self.inverse_capacity: FloatArray = np.divide(
            1.0, self.capacity, out=np.zeros(self.capacity.shape), where=self.capacity > 0
        )
        """1 / capacity, or 0 where the capacity is 0."""
        self.ready: BoolArray = np.array([node.ready for node in nodes], dtype=np.bool_)
        self.not_draining: BoolArray = self._availability_is_not(nodes, Availability.DRAIN)
        self.not_paused: BoolArray = self._availability_is_not(nodes, Availability.PAUSE)
        self.node_hashes: HashArray = np.array([stable_hash(seed, i) for i in self.ids], dtype=np.uint64)
        self.seed = seed
        self.version = 0
        """Bumped by every commit() and its relatives, so callers can tell whether the table changed."""
        self._labels = [node.labels for node in nodes]
        self._label_values: dict[str, npt.NDArray[np.object_]] = {}
        self._constraint_masks: dict[Constraint, BoolArray] = {}
        self._all_constraints_masks: dict[tuple[Constraint, ...], BoolArray] = {}
        self._service_index = _index_service_counts(nodes)
        self._service_counts: dict[str, IntArray] = {}
        self._domains: dict[str, IntArray] = {}
        self._domain_counts: dict[str, dict[str, IntArray]] = {}

    @classmethod
    def build(cls, nodes: Sequence[NodeInfo], tasks: Sequence[TaskRequest], *, seed: int) -> NodeTable:
        """A table with a column for cpu, memory and every scalar any node or task names."""
        names: set[str] = set()
        for node in nodes:
            names.update(node.capacity.scalars, node.allocated.scalars)
        for task in tasks:
            names.update(task.resources.scalars)
        return cls(nodes, sorted(names), seed=seed)

    def dim(self, name: str) -> int:
        """The column of scalar resource ``name``."""
        return self._scalar_columns[name]

    def vector(self, resources: Resources) -> IntArray:
        """``resources`` as a row of this table (scalars without a column are dropped)."""
        row = np.zeros(len(self.dims), dtype=np.int64)
        row[CPU_DIM] = resources.cpu_millis
        row[MEMORY_DIM] = resources.memory_bytes
        for name, amount in resources.scalars.items():
            column = self._scalar_columns.get(name)
            if column is not None:
                row[column] = amount
        return row

    def constraint_mask(self, constraint: Constraint) -> BoolArray:
        """Nodes that satisfy ``constraint`` (computed once per distinct constraint)."""
        mask = self._constraint_masks.get(constraint)
        if mask is None:
            mask = self._evaluate_constraint(constraint)
            self._constraint_masks[constraint] = mask
        return mask

    def constraints_mask(self, constraints: tuple[Constraint, ...]) -> BoolArray:
        """Nodes that satisfy every one of ``constraints`` (once per distinct tuple; read-only)."""
        mask = self._all_constraints_masks.get(constraints)
        if mask is None:
            mask = np.ones(self.size, dtype=np.bool_)
            for constraint in constraints:
                mask &= self.constraint_mask(constraint)
            self._all_constraints_masks[constraints] = mask
        return mask

    def service_counts(self, service: str) -> IntArray:
        """Replicas of ``service`` on each node, including those placed in this call."""
        counts = self._service_counts.get(service)
        if counts is None:
            counts = np.zeros(self.size, dtype=np.int64)
            for row, count in self._service_index.get(service, ()):
                counts[row] = count
            self._service_counts[service] = counts
        return counts

    def any_service(self) -> BoolArray:
        """Nodes that held a replica of any service when the table was built."""
        mask = np.zeros(self.size, dtype=np.bool_)
        for entries in self._service_index.values():
            mask[[row for row, count in entries if count > 0]] = True
        return mask

    def domains(self, key: str) -> IntArray:
        """A code per node for its value of label ``key`` (a missing label is the value ``""``)."""
        codes = self._domains.get(key)
        if codes is None:
            _, inverse = np.unique(
                np.array([labels.get(key, "") for labels in self._labels], dtype=np.str_),
                return_inverse=True,
            )
            codes = np.asarray(inverse, dtype=np.int64).reshape(self.size)
            self._domains[key] = codes
        return codes

    def domain_counts(self, service: str, key: str) -> IntArray:
        """Replicas of ``service`` per value of label ``key``, indexed by :meth:`domains` code,
        including those placed in this call."""
        by_key = self._domain_counts.setdefault(service, {})
        counts = by_key.get(key)
        if counts is None:
            codes = self.domains(key)
            counts = np.bincount(codes, weights=self.service_counts(service), minlength=1).astype(np.int64)
            by_key[key] = counts
        return counts

    def free(self, column: int) -> IntArray:
        """Free amount of dimension ``column`` on every node (negative when over-committed)."""
        free: IntArray = self.capacity[column] - self.allocated[column]
        return free

    def commit(self, row: int, request: IntArray, service: str) -> None:
        """Record a task of ``service`` asking for ``request`` as placed on node ``row``."""
        self.allocated[:, row] += request
        self.service_counts(service)[row] += 1
        for key, counts in self._domain_counts.get(service, {}).items():
            counts[self._domains[key][row]] += 1
        self.version += 1

    def commit_rows(self, rows: IntArray, request: IntArray, service: str) -> None:
        """:meth:`commit` of one task on each of ``rows`` (distinct nodes), as array operations."""
        self._add_rows(rows, request, service, 1)

    def uncommit_rows(self, rows: IntArray, request: IntArray, service: str) -> None:
        """Undo :meth:`commit_rows`."""
        self._add_rows(rows, request, service, -1)

    def _add_rows(self, rows: IntArray, request: IntArray, service: str, sign: int) -> None:
        self.allocated[:, rows] += sign * request[:, np.newaxis]
        self.service_counts(service)[rows] += sign
        for key, counts in self._domain_counts.get(service, {}).items():
            np.add.at(counts, self._domains[key][rows], sign)
        self.version += 1

    def uncommit(self, row: int, request: IntArray, service: str) -> None:
        """Undo one :meth:`commit` of a task of ``service`` asking for ``request`` on node ``row``
        (used by :mod:`.batch` to move a task of the batch being planned, never a running one)."""
        self.allocated[:, row] -= request
        self.service_counts(service)[row] -= 1
        for key, counts in self._domain_counts.get(service, {}).items():
            counts[self._domains[key][row]] -= 1
        self.version += 1

    def _matrix(self, columns: Sequence[Resources]) -> IntArray:
        matrix = np.zeros((len(self.dims), len(columns)), dtype=np.int64)
        for i, resources in enumerate(columns):
            matrix[:, i] = self.vector(resources)
        return matrix

    @staticmethod
    def _availability_is_not(nodes: Sequence[NodeInfo], availability: Availability) -> BoolArray:
        return np.array([node.availability is not availability for node in nodes], dtype=np.bool_)

    def _evaluate_constraint(self, constraint: Constraint) -> BoolArray:
        values = self._label_values.get(constraint.key)
        if values is None:
            values = np.array([labels.get(constraint.key) for labels in self._labels], dtype=np.object_)
            self._label_values[constraint.key] = values
        if constraint.op == "in":
            accepted = frozenset(constraint.values)
            return np.array([value in accepted for value in values], dtype=np.bool_)
        equal: BoolArray = np.asarray(values == constraint.value, dtype=np.bool_).reshape(self.size)
        if constraint.op == "==":
            return equal
        if constraint.op == "!=":
            return ~equal
        return np.zeros(self.size, dtype=np.bool_)


def _index_service_counts(nodes: Sequence[NodeInfo]) -> dict[str, list[tuple[int, int]]]:
    index: dict[str, list[tuple[int, int]]] = {}
    for row, node in enumerate(nodes):
        for service, count in node.service_counts.items():
            index.setdefault(service, []).append((row, count))
    return index
