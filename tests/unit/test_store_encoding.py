"""The store's fast record encoding (``controller/record_json.py``) writes exactly the bytes
``json_format`` would (etcd values stay the documented JSON, readable with etcdctl, and decode back
to the same message)."""

from __future__ import annotations

import math

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.controller.store import decode, encode
from berth.proto.berth.v1 import types_pb2 as pb


def reference(message: pb.Task) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


text = st.text(max_size=12)
specs = st.builds(
    lambda name, image, replicas, env, args, cpu, mem, scalars, ports, spread, pids: pb.ServiceSpec(
        name=name,
        image=image,
        replicas=replicas,
        env=env,
        args=args,
        resources=pb.Resources(cpu_millis=cpu, memory_bytes=mem, scalars=scalars),
        ports=[pb.PortSpec(container_port=p, protocol="tcp") for p in ports],
        constraints=[pb.Constraint(key="zone", op="in", values=["eu", "us"])] if spread else [],
        spread=["zone"] if spread else [],
        pids_limit=pids,
        network=pb.NETWORK_MODE_BRIDGE,
        on_disconnect=pb.ON_DISCONNECT_STOP if spread else pb.ON_DISCONNECT_UNSPECIFIED,
    ),
    text,
    text,
    st.integers(0, 10_000),
    st.dictionaries(text, text, max_size=3),
    st.lists(text, max_size=3),
    st.integers(0, 2**40),
    st.integers(0, 2**62),
    st.dictionaries(st.sampled_from(["gpu", "disk", "ünï"]), st.integers(0, 2**50), max_size=2),
    st.lists(st.integers(1, 65535), max_size=2),
    st.booleans(),
    st.integers(-(2**62), 2**62),
)
tasks = st.builds(
    lambda spec, tid, node, slot, gen, reason, created, assigned, ports: pb.Task(
        id=tid,
        service=spec.name,
        slot=slot,
        spec_generation=gen,
        spec=spec,
        node_id=node,
        desired_state=pb.TASK_STATE_RUNNING,
        pending_reason=reason,
        created_at=created,
        assigned_at=assigned,
        ports=[pb.PortMapping(container_port=p, host_port=p + 1, protocol="tcp") for p in ports],
    ),
    specs,
    text,
    text,
    st.integers(0, 2**31),
    st.integers(0, 2**62),
    text,
    st.floats(allow_nan=False),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(1, 60000), max_size=2),
)
states = st.sampled_from([0, *pb.TaskState.values(), 99])  # 99: a number without a name
word = st.text(min_size=1, max_size=12)
placed_tasks = st.builds(  # the shape every placement writes: the encoder's fast path
    lambda spec, tid, node, slot, gen, state, created, assigned: pb.Task(
        id=tid,
        service=spec.name or "s",
        slot=slot,
        spec_generation=gen,
        spec=spec,
        node_id=node,
        desired_state=state,
        created_at=created,
        assigned_at=assigned,
    ),
    specs,
    word,
    word,
    st.integers(1, 2**31),
    st.integers(-(2**62), 2**62).filter(bool),
    states.filter(bool),
    st.floats(allow_nan=False, allow_infinity=False).filter(bool),
    st.floats().filter(bool),
)
statuses = st.builds(
    lambda tid, node, state, msg, err, pid, ip, restarts, code, updated, started, digest: pb.TaskStatus(
        task_id=tid,
        node_id=node,
        state=state,
        message=msg,
        error=err,
        pid=pid,
        container_ip=ip,
        restarts=restarts,
        exit_code=code,
        updated_at=updated,
        started_at=started,
        image_digest=digest,
    ),
    text,
    text,
    states,
    text,
    text,
    st.integers(-(2**31), 2**31 - 1),
    text,
    st.integers(0, 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.floats(),
    st.floats(),
    text,
)


@settings(max_examples=300, deadline=None)
@given(tasks)
def test_task_bytes_equal_json_format(task: pb.Task) -> None:
    assert encode(task) == reference(task)
    assert decode(encode(task), pb.Task) == task


@settings(max_examples=300, deadline=None)
@given(placed_tasks)
def test_placed_task_bytes_equal_json_format(task: pb.Task) -> None:
    assert encode(task) == reference(task)


@settings(max_examples=300, deadline=None)
@given(statuses)
def test_status_bytes_equal_json_format(status: pb.TaskStatus) -> None:
    assert encode(status) == reference(status)
    if not math.isnan(status.updated_at) and not math.isnan(status.started_at):
        assert decode(encode(status), pb.TaskStatus) == status


@pytest.mark.parametrize(
    "created", [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-300, 1.7976931348623157e308]
)
def test_special_doubles(created: float) -> None:
    task = pb.Task(id="a.1.x", service="a", spec=pb.ServiceSpec(name="a", image="i"), created_at=created)
    assert encode(task) == reference(task)


def test_a_string_that_looks_like_the_splice_mark_stays_intact() -> None:
    task = pb.Task(id="\x00berth-spec\x00", service="\x00berth-spec\x00", spec=pb.ServiceSpec(name="s"))
    assert encode(task) == reference(task)


def test_a_desired_state_without_a_name_falls_back() -> None:
    task = pb.Task(id="a.1.x", desired_state=42)  # type: ignore[arg-type]
    assert encode(task) == reference(task)


def test_a_task_without_spec_and_other_messages() -> None:
    assert encode(pb.Task(id="a.1.x")) == reference(pb.Task(id="a.1.x"))
    status = pb.TaskStatus(task_id="a.1.x", state=pb.TASK_STATE_RUNNING, pid=7)
    assert encode(status) == json_format.MessageToJson(status, indent=None, sort_keys=True).encode()
    node = pb.Node(id="n1", name="host-1", capacity=pb.Resources(cpu_millis=2000))
    assert encode(node) == json_format.MessageToJson(node, indent=None, sort_keys=True).encode()
