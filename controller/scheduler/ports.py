"""Host port bookkeeping for one schedule() call.

A fixed host port (``host_port != 0``) must be free on the node, so a node holds at most one
task per fixed ``(protocol, host_port)``. A dynamic port (``host_port == 0``) takes the lowest
free port of the dynamic range for its protocol on the chosen node. Ports are only ever added
during a call, so the lowest free dynamic port of a node never moves down: a per-node cursor
remembers where to resume the search.

Masks over all nodes ("is this port used?", "are enough dynamic ports left?") are arrays, built
lazily for the port keys and protocols that tasks actually ask for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .model import BoolArray, IntArray, NodeInfo, PortRequest

PortKey = tuple[str, int]
"""``(protocol, host_port)``."""
Mapped = tuple[int, int, str]
"""``(container_port, host_port, protocol)``."""


def protocol_of(request: PortRequest) -> str:
    """The request's protocol, with an empty string read as ``tcp``."""
    return request.protocol or "tcp"


def fixed_keys(requests: Sequence[PortRequest]) -> list[PortKey]:
    """The fixed ``(protocol, host_port)`` keys of a task, in request order (duplicates kept)."""
    return [(protocol_of(r), r.host_port) for r in requests if r.host_port != 0]


def has_duplicate_fixed(requests: Sequence[PortRequest]) -> bool:
    """True when one task asks for the same fixed host port twice."""
    keys = fixed_keys(requests)
    return len(keys) != len(set(keys))


def dynamic_demand(requests: Sequence[PortRequest]) -> dict[str, int]:
    """Number of dynamic ports a task needs, per protocol."""
    demand: dict[str, int] = {}
    for request in requests:
        if request.host_port == 0:
            protocol = protocol_of(request)
            demand[protocol] = demand.get(protocol, 0) + 1
    return demand


class PortBook:
    """Used host ports of every node, as the working state of one schedule() call."""

    def __init__(self, nodes: Sequence[NodeInfo], dynamic_range: tuple[int, int]) -> None:
        low, high = dynamic_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"dynamic port range must be within 1..65535 and ordered, got {dynamic_range}")
        self.low = low
        self.high = high
        self._size = len(nodes)
        self._used: list[frozenset[PortKey] | set[PortKey]] = [node.used_ports for node in nodes]
        self._owners: dict[PortKey, list[int]] | None = None
        self._used_masks: dict[PortKey, BoolArray] = {}
        self._dynamic_used: dict[str, IntArray] = {}
        self._cursors: dict[tuple[int, str], int] = {}

    @property
    def range_size(self) -> int:
        """Number of ports in the dynamic range."""
        return self.high - self.low + 1

    def in_range(self, port: int) -> bool:
        """True when ``port`` lies in the dynamic range."""
        return self.low <= port <= self.high

    def is_used(self, row: int, key: PortKey) -> bool:
        """True when ``key`` is taken on node ``row``."""
        return key in self._used[row]

    def any_used(self) -> BoolArray:
        """Nodes on which any host port is taken."""
        return np.array([bool(used) for used in self._used], dtype=np.bool_).reshape(self._size)

    def used_mask(self, key: PortKey) -> BoolArray:
        """Nodes on which ``key`` is taken."""
        mask = self._used_masks.get(key)
        if mask is None:
            mask = np.zeros(self._size, dtype=np.bool_)
            mask[self._port_owners().get(key, [])] = True
            self._used_masks[key] = mask
        return mask

    def fixed_free_mask(self, requests: Sequence[PortRequest]) -> BoolArray:
        """Nodes on which every fixed host port of the task is free."""
        if has_duplicate_fixed(requests):
            return np.zeros(self._size, dtype=np.bool_)
        free = np.ones(self._size, dtype=np.bool_)
        for key in fixed_keys(requests):
            free &= ~self.used_mask(key)
        return free

    def dynamic_free_mask(self, requests: Sequence[PortRequest]) -> BoolArray:
        """Nodes with enough free dynamic ports left for the task, per protocol.

        The task's own fixed ports inside the range count as taken.
        """
        free = np.ones(self._size, dtype=np.bool_)
        fixed = set(fixed_keys(requests))
        for protocol, needed in dynamic_demand(requests).items():
            own = sum(1 for p, port in fixed if p == protocol and self.in_range(port))
            left = self.range_size - own - self.dynamic_used(protocol)
            free &= left >= needed
        return free

    def dynamic_used(self, protocol: str) -> IntArray:
        """Ports of the dynamic range taken on each node for ``protocol``."""
        counts = self._dynamic_used.get(protocol)
        if counts is None:
            counts = np.zeros(self._size, dtype=np.int64)
            for (p, port), rows in self._port_owners().items():
                if p == protocol and self.in_range(port):
                    np.add.at(counts, rows, 1)
            self._dynamic_used[protocol] = counts
        return counts

    def allocate(self, row: int, requests: Sequence[PortRequest]) -> tuple[Mapped, ...]:
        """Take the task's ports on node ``row``; fixed ones as asked, dynamic ones lowest first.

        The caller has checked feasibility (fixed_free_mask, dynamic_free_mask) for this node.
        """
        for key in fixed_keys(requests):
            self._take(row, key)
        mapped: list[Mapped] = []
        for request in requests:
            protocol = protocol_of(request)
            host_port = request.host_port or self._lowest_free(row, protocol)
            if request.host_port == 0:
                self._take(row, (protocol, host_port))
            mapped.append((request.container_port, host_port, protocol))
        return tuple(mapped)

    def _lowest_free(self, row: int, protocol: str) -> int:
        port = self._cursors.get((row, protocol), self.low)
        while port <= self.high and self.is_used(row, (protocol, port)):
            port += 1
        if port > self.high:
            raise RuntimeError(f"no free {protocol} port on node row {row}; feasibility was not checked")
        self._cursors[(row, protocol)] = port
        return port

    def _take(self, row: int, key: PortKey) -> None:
        used = self._used[row]
        if isinstance(used, frozenset):
            used = set(used)
            self._used[row] = used
        used.add(key)
        if self._owners is not None:
            self._owners.setdefault(key, []).append(row)
        mask = self._used_masks.get(key)
        if mask is not None:
            mask[row] = True
        protocol, port = key
        counts = self._dynamic_used.get(protocol)
        if counts is not None and self.in_range(port):
            counts[row] += 1

    def _port_owners(self) -> dict[PortKey, list[int]]:
        if self._owners is None:
            owners: dict[PortKey, list[int]] = {}
            for row, used in enumerate(self._used):
                for key in used:
                    owners.setdefault(key, []).append(row)
            self._owners = owners
        return self._owners
