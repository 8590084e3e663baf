"""Node liveness: a deadline per node, renewed by every message its agent sends.

Defaults (see docs/failure-handling.md for the reasoning): agents heartbeat every second; a node
whose last message is older than ``NODE_DEADLINE`` (4 s) is declared down. Detection therefore
takes 3-4 s after a silent loss, and a node must miss four heartbeats in a row — a busy host
whose agent is merely slowed by CPU contention still gets a heartbeat through well inside that.
At-most-one services wait ``AT_MOST_ONE_MARGIN`` longer, so the agent (which stops their
containers once its own heartbeats go unacknowledged for the deadline) is done before any copy is
started elsewhere.

A controller that starts (or restarts, or takes over) gives every known node a fresh deadline
before judging it: a controller restart reschedules nothing.

Large clusters stretch the timing, as Nomad does with ``max_heartbeats_per_second``: the
controller handles at most ``MAX_HEARTBEATS_PER_SECOND`` heartbeats in all, so past 1,000 nodes
the interval grows with the node count and the deadline with it (4 intervals): 5,000 nodes
heartbeat every 5 s and are declared down after 20 s of silence. Every heartbeat ack carries the
current timing and agents follow it. Within one controller's life the timing only grows: an agent
that was told a long interval is never judged by a shorter deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

HEARTBEAT_INTERVAL = 1.0
NODE_DEADLINE = 4.0
AT_MOST_ONE_MARGIN = 2.0
MAX_HEARTBEATS_PER_SECOND = 1000.0


class Liveness:
    """Deadlines on the monotonic clock (wall-clock jumps must not kill nodes)."""

    def __init__(
        self,
        deadline: float = NODE_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_heartbeats_per_second: float = MAX_HEARTBEATS_PER_SECOND,
    ) -> None:
        if max_heartbeats_per_second <= 0:
            raise ValueError("max_heartbeats_per_second must be positive")
        self.interval = HEARTBEAT_INTERVAL
        self.deadline = deadline
        self.clock = clock
        self.max_heartbeats_per_second = max_heartbeats_per_second
        self._deadline_intervals = deadline / HEARTBEAT_INTERVAL
        self._last: dict[str, float] = {}

    def scale_to(self, node_count: int) -> bool:
        """Stretch the heartbeat interval so ``node_count`` nodes send at most the configured rate;
        True if the timing changed. Never shrinks (see the module docstring)."""
        interval = max(HEARTBEAT_INTERVAL, node_count / self.max_heartbeats_per_second)
        if interval <= self.interval:
            return False
        self.interval = interval
        self.deadline = max(self.deadline, interval * self._deadline_intervals)
        return True

    def seen(self, node_id: str) -> None:
        self._last[node_id] = self.clock()

    def fresh(self, node_ids: Iterable[str]) -> None:
        """Start every node's deadline now (controller start)."""
        now = self.clock()
        for node_id in node_ids:
            self._last[node_id] = now

    def forget(self, node_id: str) -> None:
        self._last.pop(node_id, None)

    def silent_for(self, node_id: str) -> float:
        """Seconds since the node was last heard from (0 for an unknown node: it gets a fresh start)."""
        last = self._last.get(node_id)
        if last is None:
            self._last[node_id] = self.clock()
            return 0.0
        return self.clock() - last

    def scan(self, node_ids: Iterable[str]) -> tuple[list[str], float]:
        """The nodes silent for longer than the deadline, and the moment the least recently heard
        of the others was last heard: none of them can pass the deadline before that moment plus
        the deadline, so a caller need not scan again until then (last-heard times only move
        forward). An unknown node gets a fresh start. One clock read for all nodes."""
        now = self.clock()
        cutoff = now - self.deadline
        last = self._last
        out = []
        oldest = now
        for node_id in node_ids:
            seen = last.get(node_id)
            if seen is None:
                last[node_id] = now
            elif seen < cutoff:
                out.append(node_id)
            elif seen < oldest:
                oldest = seen
        return out, oldest

    def none_silent_since(self, moment: float) -> bool:
        """Whether a node last heard at ``moment`` (or later) is still within its deadline."""
        return self.clock() - self.deadline <= moment
