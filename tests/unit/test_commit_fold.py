"""How a commit is cut into transactions and what each committed one tells the agents."""

from __future__ import annotations

from typing import cast

import pytest

from berth.controller.cluster import Cluster
from berth.controller.state import ClusterState
from berth.controller.store import Keys, Op, Put, Store, Stored, _chunks
from berth.proto.berth.v1 import agent_pb2
from berth.proto.berth.v1 import types_pb2 as pb

KEYS = Keys("/t/")
SLOT = KEYS.task("web", 1)


def _puts(n: int) -> list[Op]:
    return [Put(KEYS.task("s", i), pb.Task(id=f"s.{i}"), 0) for i in range(n)]


def test_chunks_keep_a_chained_pair_in_one_transaction() -> None:
    ops = _puts(127)
    ops += [
        Put(SLOT, pb.Task(id="new"), 5, with_next=True),
        Put(KEYS.retiring_task("old"), pb.Task(id="old"), 0),
    ]
    ops += _puts(3)
    chunks = [list(c) for c in _chunks(ops, 128)]
    assert [len(c) for c in chunks] == [127, 5]  # the pair did not fit after 127: it opens the next
    assert [op for c in chunks for op in c] == ops
    unchained = _puts(300)
    assert [len(c) for c in _chunks(unchained, 128)] == [128, 128, 44]


def test_a_group_larger_than_a_transaction_is_refused() -> None:
    ops: list[Op] = [Put(KEYS.task("s", i), pb.Task(), 0, with_next=True) for i in range(3)]
    with pytest.raises(ValueError, match="must commit together"):
        list(_chunks([*ops, Put(SLOT, pb.Task(), 0)], 3))


class _KeysOnly:
    keys = KEYS


def _cluster(*tasks: tuple[str, pb.Task]) -> Cluster:
    cluster = Cluster(cast(Store, _KeysOnly()))
    cluster.state = ClusterState(keys=KEYS, tasks={key: Stored(task, 5) for key, task in tasks})
    return cluster


def _fold(
    cluster: Cluster, batch: list[Op], revisions: dict[str, int]
) -> list[tuple[str, agent_pb2.Assignments]]:
    """What folding ``batch`` tells the agents: (node id, assignments), in order."""
    outgoing: list[tuple[str, agent_pb2.ControllerMessage]] = []
    cluster._fold(batch, revisions, outgoing=outgoing)
    return [(node_id, message.assignments) for node_id, message in outgoing]


def test_a_drain_move_tells_the_old_node_nothing() -> None:
    old = pb.Task(id="web.1.old", service="web", slot=1, node_id="A")
    new = pb.Task(id="web.1.new", service="web", slot=1, node_id="B")
    cluster = _cluster((SLOT, old))
    batch: list[Op] = [Put(SLOT, new, 5, with_next=True), Put(KEYS.retiring_task(old.id), old, 0)]
    sent = _fold(cluster, batch, {op.key: 9 for op in batch})
    assert [(node, [t.id for t in a.tasks], list(a.removed)) for node, a in sent] == [("B", [new.id], [])]
    assert set(cluster.state.on_node["A"]) == {old.id}


def test_a_replacement_stops_the_old_task_and_starts_the_new_one() -> None:
    old = pb.Task(id="web.1.old", service="web", slot=1, node_id="A")
    new = pb.Task(id="web.1.new", service="web", slot=1, node_id="B")
    cluster = _cluster((SLOT, old))
    sent = _fold(cluster, [Put(SLOT, new, 5)], {SLOT: 9})
    got = sorted((node, [t.id for t in a.tasks], list(a.removed)) for node, a in sent)
    assert got == [("A", [], [old.id]), ("B", [new.id], [])]
    assert cluster.state.revision_of(SLOT) == 9
