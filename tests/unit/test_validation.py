"""validate_spec(): good specs pass; each bad spec names the offending field."""

from __future__ import annotations

from typing import Any

import pytest

from berth.controller.errors import InvalidError
from berth.controller.validation import SpecError, validate_spec
from berth.proto.berth.v1 import types_pb2 as pb

DIGEST = "sha256:" + "a" * 64


def spec(**fields: Any) -> pb.ServiceSpec:
    base: dict[str, Any] = {"name": "web", "image": "nginx:1.27", "replicas": 2}
    base.update(fields)
    return pb.ServiceSpec(**base)


def port(container: int, host: int = 0, protocol: str = "") -> pb.PortSpec:
    return pb.PortSpec(container_port=container, host_port=host, protocol=protocol)


def constraint(
    key: str = "env", op: str = "==", value: str = "prod", values: tuple[str, ...] = ()
) -> pb.Constraint:
    return pb.Constraint(key=key, op=op, value=value, values=values)


def one_of(*values: str, key: str = "zone") -> pb.Constraint:
    return pb.Constraint(key=key, op="in", values=values)


GOOD = [
    ("minimal", spec()),
    ("one-char-name", spec(name="a")),
    ("63-char-name", spec(name="a" * 63)),
    ("zero-replicas", spec(replicas=0)),
    ("max-replicas", spec(replicas=10_000)),
    ("image-no-tag", spec(image="nginx")),
    ("image-registry-port-path", spec(image="registry.local:5000/team/app:v1.2.3")),
    ("image-localhost", spec(image="localhost/app_x")),
    ("image-digest", spec(image=f"ghcr.io/org/app@{DIGEST}")),
    ("image-tag-and-digest", spec(image=f"app:1@{DIGEST}")),
    (
        "resources",
        spec(resources=pb.Resources(cpu_millis=1_000_000, memory_bytes=4 * 1024 * 1024, scalars={"gpu": 1})),
    ),
    ("no-memory-limit", spec(resources=pb.Resources(memory_bytes=0))),
    ("ports", spec(ports=[port(80, 8080), port(80, 0, "udp"), port(443), port(53, 53, "udp")])),
    ("host-network-same-port", spec(network=pb.NETWORK_MODE_HOST, ports=[port(80, 80), port(81)])),
    ("env", spec(env={"FOO": "1", "_bar2": "x"})),
    ("constraints", spec(constraints=[constraint(), constraint("node.zone/a-b", "!=", "z1")])),
    ("pids", spec(pids_limit=100)),
    ("constraint-in", spec(constraints=[one_of("a", "b")])),
    ("constraint-in-one-value", spec(constraints=[one_of("a")])),
    ("constraint-in-ignores-value", spec(constraints=[constraint("zone", "in", "", ("a",))])),
    ("constraint-eq-ignores-values", spec(constraints=[constraint(values=("x",))])),
    ("max-per-node", spec(max_per_node=1)),
    ("max-per-node-max", spec(max_per_node=10_000)),
    ("spread", spec(spread=["zone", "topology.kubernetes.io/rack"])),
    ("strategy-binpack", spec(strategy=pb.STRATEGY_BINPACK)),
    ("strategy-spread", spec(strategy=pb.STRATEGY_SPREAD)),
    ("scalar-dotted", spec(resources=pb.Resources(scalars={"nvidia.com-gpu_x": 2}))),
]


@pytest.mark.parametrize("good", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_specs_pass(good: pb.ServiceSpec) -> None:
    validate_spec(good)


BAD = [
    ("name-missing", spec(name=""), "name", "required"),
    ("name-underscore", spec(name="Portal_1"), "name", "'Portal_1' is not valid; use lowercase letters"),
    ("name-trailing-dash", spec(name="web-"), "name", "starting and ending"),
    ("name-too-long", spec(name="a" * 64), "name", "at most 63 characters"),
    ("image-missing", spec(image=""), "image", "required"),
    ("image-space", spec(image="nginx latest"), "image", "not a valid image reference"),
    ("image-uppercase-repo", spec(image="Nginx"), "image", "not a valid image reference"),
    ("image-short-digest", spec(image="nginx@sha256:abc"), "image", "not a valid image reference"),
    ("replicas-too-many", spec(replicas=10_001), "replicas", "must be between 0 and 10000, got 10001"),
    ("cpu-negative", spec(resources=pb.Resources(cpu_millis=-1)), "resources.cpu_millis", "got -1"),
    ("cpu-too-much", spec(resources=pb.Resources(cpu_millis=1_000_001)), "resources.cpu_millis", "1000000"),
    ("memory-negative", spec(resources=pb.Resources(memory_bytes=-5)), "resources.memory_bytes", "got -5"),
    ("memory-below-4mib", spec(resources=pb.Resources(memory_bytes=1024)), "resources.memory_bytes", "4 MiB"),
    (
        "scalar-name",
        spec(resources=pb.Resources(scalars={"GPU": 1})),
        "resources.scalars.GPU",
        "resource name",
    ),
    ("scalar-zero", spec(resources=pb.Resources(scalars={"gpu": 0})), "resources.scalars.gpu", "at least 1"),
    (
        "scalar-cpu",
        spec(resources=pb.Resources(scalars={"cpu": 1})),
        "resources.scalars.cpu",
        "set resources.cpu_millis (--cpu",
    ),
    (
        "scalar-memory",
        spec(resources=pb.Resources(scalars={"memory": 1 << 30})),
        "resources.scalars.memory",
        "set resources.memory_bytes (--memory",
    ),
    ("container-port-zero", spec(ports=[port(80), port(0)]), "ports[1].container_port", "got 0"),
    ("container-port-high", spec(ports=[port(70000)]), "ports[0].container_port", "65535"),
    ("host-port-high", spec(ports=[port(80, 70000)]), "ports[0].host_port", "got 70000"),
    ("protocol", spec(ports=[port(80, 0, "sctp")]), "ports[0].protocol", "'tcp' or 'udp', got 'sctp'"),
    (
        "duplicate-container-port",
        spec(ports=[port(80), port(80, 0, "tcp")]),
        "ports[1].container_port",
        "ports[0]",
    ),
    ("duplicate-host-port", spec(ports=[port(80, 8080), port(81, 8080)]), "ports[1].host_port", "tcp/8080"),
    (
        "host-network-remap",
        spec(network=pb.NETWORK_MODE_HOST, ports=[port(80, 8080)]),
        "ports[0].host_port",
        "network HOST",
    ),
    ("env-key", spec(env={"FOO-BAR": "1"}), "env.FOO-BAR", "not a valid variable name"),
    ("env-key-digit", spec(env={"1X": "1"}), "env.1X", "not starting with a digit"),
    ("constraint-key-empty", spec(constraints=[constraint(key="")]), "constraints[0].key", "required"),
    ("constraint-key-bad", spec(constraints=[constraint(key="-x")]), "constraints[0].key", "label key"),
    ("constraint-op", spec(constraints=[constraint(), constraint(op="=")]), "constraints[1].op", "got '='"),
    ("constraint-value", spec(constraints=[constraint(value="")]), "constraints[0].value", "required"),
    ("pids-negative", spec(pids_limit=-1), "pids_limit", "got -1"),
    ("constraint-op-in-listed", spec(constraints=[constraint(op="=~")]), "constraints[0].op", "'in'"),
    (
        "constraint-in-no-values",
        spec(constraints=[one_of()]),
        "constraints[0].values",
        "required with op 'in'",
    ),
    (
        "constraint-in-value-not-values",
        spec(constraints=[constraint("zone", "in", "a")]),
        "constraints[0].values",
        "required with op 'in'",
    ),
    (
        "constraint-in-empty-value",
        spec(constraints=[constraint(), one_of("a", "")]),
        "constraints[1].values[1]",
        "must not be empty",
    ),
    ("constraint-in-bad-key", spec(constraints=[one_of("a", key="")]), "constraints[0].key", "required"),
    (
        "constraint-ne-value",
        spec(constraints=[constraint(op="!=", value="")]),
        "constraints[0].value",
        "required",
    ),
    ("max-per-node-too-many", spec(max_per_node=10_001), "max_per_node", "at most 10000, got 10001"),
    ("spread-empty", spec(spread=["zone", ""]), "spread[1]", "must not be empty"),
    ("spread-bad-key", spec(spread=["-zone"]), "spread[0]", "not a valid label key"),
    ("spread-duplicate", spec(spread=["zone", "rack", "zone"]), "spread[2]", "already listed at spread[0]"),
    ("strategy-unknown", spec(strategy=7), "strategy", "BINPACK or SPREAD"),
    ("scalar-negative", spec(resources=pb.Resources(scalars={"gpu": -2})), "resources.scalars.gpu", "got -2"),
    (
        "scalar-digit-first",
        spec(resources=pb.Resources(scalars={"1gpu": 1})),
        "resources.scalars.1gpu",
        "letter",
    ),
    ("first-problem-wins", spec(name="", image=""), "name", "required"),
]


@pytest.mark.parametrize(("bad", "field", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_specs_name_the_field(bad: pb.ServiceSpec, field: str, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        validate_spec(bad)
    assert caught.value.field == field
    assert fragment in caught.value.message
    assert str(caught.value) == f"{field}: {caught.value.message}"


def test_spec_error_is_value_and_invalid_error() -> None:
    error = SpecError("replicas", "must be between 0 and 10000, got -1")
    assert isinstance(error, ValueError)
    assert isinstance(error, InvalidError)
    assert str(error) == "replicas: must be between 0 and 10000, got -1"
