"""The controller's metrics pieces that need no cluster: reason codes, discovery groups, and the
state series built from a view (names and label sets checked against the catalog)."""

from __future__ import annotations

import pytest
import typer

from berth.controller.__main__ import parse_listen
from berth.controller.metrics import (
    PENDING_REASONS,
    ControllerMetrics,
    StateCollector,
    StateView,
    reason_code,
    sd_targets,
)
from berth.controller.scheduler import constraint_reason, max_per_node_reason, scalar_reason
from berth.controller.scheduler.model import Constraint
from berth.proto.berth.v1 import types_pb2 as pb
from tests.unit.metric_catalog import CONTROLLER_METRICS, METRICS


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("0/0 nodes available: no nodes registered", "no-nodes"),
        ("0/5 nodes available: 3 insufficient memory, 2 insufficient cpu", "insufficient-memory"),
        ("0/5 nodes available: 5 insufficient cpu", "insufficient-cpu"),
        (f"0/2 nodes available: 2 {scalar_reason('gpu')}", "insufficient-resource"),
        ("0/3 nodes available: 3 host port conflict", "port-conflict"),
        ("0/3 nodes available: 3 no free dynamic port", "port-conflict"),
        (
            f"0/4 nodes available: 4 {constraint_reason(Constraint(key='zone', op='==', value='eu'))}",
            "constraint",
        ),
        (f"0/4 nodes available: 4 {max_per_node_reason('web', 1)}", "max-per-node"),
        ("0/2 nodes available: 1 node draining, 1 node down", "node-unavailable"),
        ("waiting for the scheduler", "waiting"),
        ("", "waiting"),
    ],
)
def test_reason_codes(reason: str, code: str) -> None:
    assert reason_code(reason) == code
    assert code in PENDING_REASONS


def test_discovery_lists_the_controller_and_agents_with_an_address() -> None:
    nodes = [
        pb.Node(id="b1", name="h2", metrics_address="10.0.0.2:9371"),
        pb.Node(id="a1", name="h1", metrics_address="10.0.0.1:9371"),
        pb.Node(id="c1", name="h3"),  # metrics off on that agent
    ]
    groups = sd_targets("127.0.0.1:9370", nodes)
    assert groups == [
        {"targets": ["127.0.0.1:9370"], "labels": {"__meta_berth_component": "controller"}},
        {
            "targets": ["10.0.0.1:9371"],
            "labels": {
                "__meta_berth_component": "agent",
                "__meta_berth_node": "h1",
                "__meta_berth_node_id": "a1",
            },
        },
        {
            "targets": ["10.0.0.2:9371"],
            "labels": {
                "__meta_berth_component": "agent",
                "__meta_berth_node": "h2",
                "__meta_berth_node_id": "b1",
            },
        },
    ]


def test_state_series_from_a_view() -> None:
    metrics = ControllerMetrics()
    view = StateView(
        desired={"web": 3},
        running={"web": 2},
        pending={("web", "insufficient-memory"): 1, ("web", "waiting"): 0},
        nodes=[
            ("h1", True, {"cpu": 2.0, "memory": 4e9, "gpu": 1.0}, {"cpu": 0.5, "memory": 1e9}),
            ("h2", False, {"cpu": 2.0, "memory": 4e9}, {}),
        ],
    )
    metrics.registry.register(StateCollector(lambda: view))
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    assert got[("berth_service_desired_replicas", (("service", "web"),))] == 3
    assert got[("berth_service_running_replicas", (("service", "web"),))] == 2
    assert got[("berth_tasks_pending", (("reason", "insufficient-memory"), ("service", "web")))] == 1
    assert got[("berth_nodes", (("state", "ready"),))] == 1
    assert got[("berth_nodes", (("state", "down"),))] == 1
    assert got[("berth_node_up", (("node", "h2"),))] == 0
    assert got[("berth_node_capacity", (("node", "h1"), ("resource", "gpu")))] == 1
    assert got[("berth_node_allocated", (("node", "h1"), ("resource", "gpu")))] == 0
    assert got[("berth_node_allocated", (("node", "h1"), ("resource", "cpu")))] == 0.5
    assert got[("berth_controller_leader", ())] == 1
    families = {family.name for family in metrics.registry.collect()}
    # prometheus_client names counters without _total in the family; the catalog with it
    catalog = {n.removesuffix("_total") for n in CONTROLLER_METRICS}
    assert families == catalog
    for name, labels in got:
        base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        entry = METRICS.get(name) or METRICS.get(base)
        assert entry is not None, name
        assert {k for k, _ in labels} - {"le"} == set(entry[1]), name


@pytest.mark.parametrize("value", ["bogus", "host:", ":9370", "1.2.3.4:99999"])
def test_a_bad_metrics_address_names_the_flag(value: str) -> None:
    with pytest.raises(typer.BadParameter) as caught:
        parse_listen(value)
    assert caught.value.param_hint == "--metrics-listen"
    assert value in caught.value.message


def test_metrics_can_be_turned_off_or_given_an_address() -> None:
    assert parse_listen("") is None
    assert parse_listen("0.0.0.0:9370") == ("0.0.0.0", 9370)
    assert parse_listen("[::1]:9370") == ("::1", 9370)
