"""The cache's per-node index keeps a drained task on its node while either of its keys places it
there, whichever order the drain's two writes are folded in (the controller commits them in one
transaction, slot first; the index does not depend on that)."""

from __future__ import annotations

import pytest

from berth.controller.state import ClusterState
from berth.controller.store import Delete, Keys, Op, Put, Stored
from berth.proto.berth.v1 import types_pb2 as pb

KEYS = Keys("/t/")
SLOT = KEYS.task("web", 1)


def _state() -> tuple[ClusterState, pb.Task]:
    old = pb.Task(id="web.1.old", service="web", slot=1, node_id="A")
    state = ClusterState(keys=KEYS, tasks={SLOT: Stored(old, 5)})
    return state, old


def _apply(state: ClusterState, ops: list[Op]) -> None:
    for op in ops:  # one transaction each
        state.apply([op], {op.key: 9})


@pytest.mark.parametrize("retiring_first", [False, True])
def test_a_drained_task_stays_on_its_node_until_it_retires(retiring_first: bool) -> None:
    state, old = _state()
    new = pb.Task(id="web.1.new", service="web", slot=1, node_id="B")
    ops: list[Op] = [Put(SLOT, new), Put(KEYS.retiring_task(old.id), old)]
    _apply(state, ops[::-1] if retiring_first else ops)
    assert set(state.on_node["A"]) == {old.id}
    assert set(state.on_node["B"]) == {new.id}
    assert state.task_by_id(old.id) == old
    _apply(state, [Delete(KEYS.retiring_task(old.id))])
    assert "A" not in state.on_node
    assert set(state.on_node["B"]) == {new.id}


def test_a_replaced_task_leaves_its_node() -> None:
    state, old = _state()
    new = pb.Task(id="web.1.new", service="web", slot=1, node_id="B")
    _apply(state, [Put(SLOT, new)])
    assert "A" not in state.on_node
    assert state.task_by_id(old.id) is None
