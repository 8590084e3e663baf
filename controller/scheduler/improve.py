"""Refill: repack the batch's movable tasks on the hosts the batch opened, one host at a time.

Greedy placement (largest first, best fit) decides for one task at a time, so it cannot see that
three medium tasks would fill a host exactly: it puts the largest next to whatever fits best now,
and the tasks that would have completed it end up spread over other hosts. Bin packing
heuristics that *fill one bin at a time* with the set of remaining items that leaves the least
slack (Gupta and Ho's minimum bin slack, 1999; the "triplet" instances of Falkenauer, 1996, and
Caprara and Toth, 2001, are built so that only such sets reach the optimum) do much better there.
:func:`refill` is a bounded version of that, run once after the greedy pass of a batch:

* the *hosts* are those empty before the call that now hold only movable tasks of the batch
  (:func:`.batch.movable`), largest capacity first; the *tasks* are the movable tasks on them,
  largest first, by each of three sizes in turn (:func:`_orderings`: the sum, the largest and
  the Euclidean norm of the task's shares of the cluster), one refill per size;
* each host in turn gets the largest task left that fits it, then the better of two completions:
  the largest tasks left that still fit, one after another (first fit decreasing inside the host),
  or first the pair of tasks left that fills the room best and then the same; the pair is an exact
  fill of every requested dimension, found through a linear hash of the request vectors (then
  checked exactly) when one exists, else the best pair among the :data:`PAIR_CANDIDATES` largest
  tasks that fit;
* a refill that needs as many hosts as the best so far stops there; the packing on the fewest
  hosts is kept only if every task found a host and fewer hosts are used than the greedy pass
  used; otherwise nothing changes. Refill only ever uses hosts the greedy pass used.

It keeps every rule of the free-hosts pass (:mod:`.batch`): only tasks of the batch move (never
one that was running before the call), never onto a host that was in use before, every placement
is checked in every dimension against the host's capacity, constraints hold (each task only goes
where its constraints allow), and no host gets two replicas of one service, so per-service
spread and ``max_per_node`` hold. Work is bounded by the batch: it runs only when the movable
tasks on such hosts number at most :data:`MAX_TASKS` (big batches of identical replicas, where it
cannot help, skip it), and each host costs a fixed number of array operations per task it takes
(over the tasks left), three times over. Measured: 0.1 s for 500 tasks on 500 empty hosts.
No clock, no randomness: ties go to the lower task index and the lower row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .batch import size_weights
from .model import BoolArray, FloatArray, HashArray, IntArray, NodeTable, TaskRequest, mix64

MAX_TASKS = 2000
"""Refill runs only when at most this many movable tasks of the batch sit on hosts it opened."""
PAIR_CANDIDATES = 48
"""The best-pair completion looks at this many of the largest tasks that fit (an exact pair is
looked for among all of them)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
"""Spreads the dimension indices before :func:`.model.mix64` turns them into hash multipliers."""


def refill(
    table: NodeTable,
    tasks: Sequence[TaskRequest],
    positions: IntArray,
    rows: IntArray,
    requests: IntArray,
    hosts: BoolArray,
) -> IntArray | None:
    """Refill the nodes of ``hosts`` (empty before the call, holding only movable tasks of the
    batch) and commit the result to ``table`` if it uses fewer of them.

    ``positions[i]`` is the batch position of movable task ``i``, ``rows[i]`` its node and
    ``requests[:, i]`` its request. Returns the tasks' new rows (the others unchanged), or ``None``
    when nothing changed.
    """
    on = hosts[rows]
    count = int(on.sum())
    if count < 2 or count > MAX_TASKS:
        return None
    picked = np.flatnonzero(on)
    old = rows[picked]
    used = np.unique(old)
    if used.size < 2:
        return None
    members = [tasks[int(positions[i])] for i in picked.tolist()]
    codes: dict[str, int] = {}
    services = np.array([codes.setdefault(t.service, len(codes)) for t in members], dtype=np.int64)
    chosen = requests[:, picked]
    shares = chosen * size_weights(table)[:, None]
    packer = Refill(table, members, chosen, old, services, used)
    new: IntArray | None = None
    bound = used.size
    for sizes in _orderings(shares):
        packing = packer.run(sizes, bound)
        if packing is not None:
            new, bound = packing, int(np.unique(packing).size)
    if new is None:
        return None
    for k, member in enumerate(members):
        table.uncommit(int(old[k]), chosen[:, k], member.service)
    for k, member in enumerate(members):
        table.commit(int(new[k]), chosen[:, k], member.service)
    result = rows.copy()
    result[picked] = new
    return result


class Refill:
    """One refill attempt over the hosts ``hosts`` and the movable batch tasks on them.

    ``requests[:, i]`` is task ``i``'s request, ``rows[i]`` its node now, ``services[i]`` a code
    for its service (equal codes: one service) and ``tasks[i]`` the task itself (for its
    constraints). The table is not changed: :meth:`run` returns the new rows or ``None``.
    """

    def __init__(
        self,
        table: NodeTable,
        tasks: Sequence[TaskRequest],
        requests: IntArray,
        rows: IntArray,
        services: IntArray,
        hosts: IntArray,
    ) -> None:
        self.table = table
        self._tasks = tasks
        self._requests = requests
        self._rows = rows
        self._services = services
        self._hosts = hosts
        self._used = np.any(requests > 0, axis=1)
        """Dimensions some task asks for: the only ones an exact fill is judged on."""
        self._hashes = _vector_hashes(requests, self._used)
        self._allowed = self._allowed_hosts()
        self._load = np.zeros((len(table.dims), table.size), dtype=np.int64)
        """Per node, the summed request of the tasks on it (taken off while it is refilled)."""
        for column in range(len(table.dims)):
            self._load[column] = np.bincount(rows, weights=requests[column], minlength=table.size)
        self._host_order = self._hosts_by_capacity()

    def run(self, sizes: FloatArray, bound: int) -> IntArray | None:
        """New rows for the tasks, taken largest first by ``sizes``, on fewer than ``bound``
        hosts; ``None`` if this order does not get there."""
        table = self.table
        count = self._rows.size
        allowed, load = self._allowed, self._load
        order = np.lexsort((np.arange(count), -sizes))
        left = np.ones(count, dtype=np.bool_)
        new_rows = np.full(count, -1, dtype=np.int64)
        hosts_used = 0
        for host in self._host_order.tolist():
            if not left.any():
                break
            room = table.capacity[:, host] - table.allocated[:, host] + load[:, host]
            chosen = self._fill(host, room, order[left[order] & allowed[order, self._column(host)]])
            if not chosen:
                continue
            if hosts_used + 1 >= bound:
                return None  # this packing cannot end below the bound
            hosts_used += 1
            new_rows[chosen] = host
            left[chosen] = False
        if left.any():
            return None
        return new_rows

    # --- hosts and what may go on them ----------------------------------------------------------

    def _column(self, host: int) -> int:
        return int(np.searchsorted(self._hosts, host))

    def _hosts_by_capacity(self) -> IntArray:
        """The hosts, largest capacity first (by the batch's size weights), then by row."""
        table = self.table
        weights = np.zeros(len(table.dims))
        total = table.capacity[:, self._hosts].sum(axis=1).astype(np.float64)
        np.divide(1.0, total, out=weights, where=total > 0)
        capacity = weights @ table.capacity[:, self._hosts].astype(np.float64)
        ordered: IntArray = self._hosts[np.lexsort((self._hosts, -capacity))]
        return ordered

    def _allowed_hosts(self) -> BoolArray:
        """``[task, host]``: the host satisfies the task's constraints (the hosts, in ``self._hosts``
        order, are all ready and active: the greedy pass put tasks on them)."""
        allowed = np.ones((self._rows.size, self._hosts.size), dtype=np.bool_)
        for i, task in enumerate(self._tasks):
            if task.constraints:
                allowed[i] = self.table.constraints_mask(task.constraints)[self._hosts]
        return allowed

    # --- filling one host -------------------------------------------------------------------------

    def _fill(self, host: int, room: IntArray, candidates: IntArray) -> list[int]:
        """The tasks (of ``candidates``, largest first) to put on ``host``; empty if none fits."""
        fits = self._fitting(candidates, room)
        if fits.size == 0:
            return []
        first = int(fits[0])
        room = room - self._requests[:, first]
        rest = fits[1:]
        rest = rest[self._services[rest] != self._services[first]]
        greedy = self._complete([first], room, rest)
        best = greedy
        pair = self._best_pair(host, room, self._fitting(rest, room))
        if pair is not None:
            v, w = pair
            after = room - self._requests[:, v] - self._requests[:, w]
            others = rest[(rest != v) & (rest != w)]
            others = others[
                (self._services[others] != self._services[v]) & (self._services[others] != self._services[w])
            ]
            paired = self._complete([first, v, w], after, others)
            if self._slack(host, paired) < self._slack(host, greedy):
                best = paired
        return best

    def _fitting(self, candidates: IntArray, room: IntArray) -> IntArray:
        fitting: IntArray = candidates[(self._requests[:, candidates] <= room[:, None]).all(axis=0)]
        return fitting

    def _complete(self, chosen: list[int], room: IntArray, candidates: IntArray) -> list[int]:
        """``chosen`` plus the largest candidates that still fit, one after another."""
        chosen = list(chosen)
        candidates = self._fitting(candidates, room)
        while candidates.size:
            u = int(candidates[0])
            chosen.append(u)
            room = room - self._requests[:, u]
            candidates = candidates[1:]
            candidates = candidates[self._services[candidates] != self._services[u]]
            candidates = self._fitting(candidates, room)
        return chosen

    def _slack(self, host: int, chosen: list[int]) -> float:
        """Free room left on ``host`` by ``chosen`` (summed over dimensions, as shares of capacity)."""
        table = self.table
        room = table.capacity[:, host] - self._requests[:, chosen].sum(axis=1)
        return float((room * table.inverse_capacity[:, host]).sum())

    def _best_pair(self, host: int, room: IntArray, candidates: IntArray) -> tuple[int, int] | None:
        """Two candidates (of different services) that fit ``room`` together and leave the least
        slack: an exact fill of every requested dimension if there is one, else the best pair of
        the :data:`PAIR_CANDIDATES` largest."""
        if candidates.size < 2:
            return None
        exact = self._exact_pair(room, candidates)
        if exact is not None:
            return exact
        top = candidates[:PAIR_CANDIDATES]
        requests = self._requests[:, top]
        total = requests[:, :, None] + requests[:, None, :]
        ok = (total <= room[:, None, None]).all(axis=0)
        ok &= np.triu(np.ones((top.size, top.size), dtype=np.bool_), k=1)
        ok &= self._services[top][:, None] != self._services[top][None, :]
        if not ok.any():
            return None
        weights = self.table.inverse_capacity[:, host]
        filled = np.tensordot(weights, total, axes=1)
        filled[~ok] = -1.0
        best = int(np.argmax(filled))
        v, w = divmod(best, top.size)
        return int(top[v]), int(top[w])

    def _exact_pair(self, room: IntArray, candidates: IntArray) -> tuple[int, int] | None:
        """Two candidates whose requests add up to ``room`` in every requested dimension (the
        first such ``v`` in candidate order, with its first partner ``w``), or ``None``."""
        target = _vector_hashes(room[:, None], self._used)[0]
        hashes = self._hashes[candidates]
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        with np.errstate(over="ignore"):
            wanted = target - hashes
        at = np.searchsorted(sorted_hashes, wanted)
        found = np.flatnonzero(
            (at < hashes.size) & (sorted_hashes[np.minimum(at, hashes.size - 1)] == wanted)
        )
        for k in found.tolist():
            v = int(candidates[k])
            j = int(at[k])
            while j < hashes.size and sorted_hashes[j] == wanted[k]:
                w = int(candidates[order[j]])
                j += 1
                if w == v or self._services[w] == self._services[v]:
                    continue
                total = self._requests[:, v] + self._requests[:, w]
                if (total[self._used] == room[self._used]).all():
                    return v, w
        return None


def _orderings(shares: FloatArray) -> tuple[FloatArray, ...]:
    """Sizes to take the tasks in, largest first, one refill per ordering (the best is kept):
    the sum of the task's shares of the cluster, the largest share, and their Euclidean norm
    (the "FFD-sum", "FFD-max" and "FFD-L2" sizes of Panigrahy et al., 2011). Each wins on
    instances where the others leave a host; trying three costs three refills."""
    total: FloatArray = shares.sum(axis=0)
    widest: FloatArray = shares.max(axis=0)
    norm: FloatArray = np.sqrt((shares * shares).sum(axis=0))
    return total, widest, norm


def _multipliers(dims: int) -> HashArray:
    """An odd pseudo-random 64-bit multiplier per dimension (fixed: the same in every process)."""
    multipliers: HashArray = mix64(np.arange(1, dims + 1, dtype=np.uint64) * _GOLDEN) | np.uint64(1)
    return multipliers


def _vector_hashes(vectors: IntArray, used: BoolArray) -> HashArray:
    """A linear 64-bit hash per column of ``vectors`` over the ``used`` dimensions: the hash of a
    sum is the (wrapping) sum of the hashes, which is what :meth:`Refill._exact_pair` relies on."""
    multipliers = _multipliers(vectors.shape[0]) * used.astype(np.uint64)
    with np.errstate(over="ignore"):
        hashes: HashArray = (vectors.astype(np.uint64) * multipliers[:, None]).sum(axis=0, dtype=np.uint64)
    return hashes
