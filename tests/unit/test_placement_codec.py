"""The controller's conversion of stored tasks to scheduler requests."""

from __future__ import annotations

from berth.controller.placement import task_request, task_requests
from berth.proto.berth.v1 import types_pb2 as pb


def test_replicas_of_one_generation_convert_as_one_by_one() -> None:
    """The per-generation template copy must carry every field (a field added to TaskRequest and
    forgotten in the copy would silently take its default)."""
    spec = pb.ServiceSpec(
        name="web",
        image="i",
        replicas=3,
        resources=pb.Resources(cpu_millis=250, memory_bytes=64 << 20, scalars={"gpu": 1}),
        ports=[pb.PortSpec(container_port=80, host_port=8080, protocol="udp")],
        constraints=[pb.Constraint(key="zone", op="in", values=["eu", "us"])],
        max_per_node=2,
        spread=["zone"],
        strategy=pb.STRATEGY_SPREAD,
    )
    tasks = [
        pb.Task(id=f"web.{slot}.x", service="web", slot=slot, spec_generation=4, spec=spec)
        for slot in (1, 2, 3)
    ]
    assert task_requests(tasks) == [task_request(t) for t in tasks]
