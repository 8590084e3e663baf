"""CLI-side parsing of flags and YAML into ServiceSpec: every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.cli.errors import InputError
from berth.cli.spec import from_mapping, load_file, parse_constraint, parse_port
from berth.proto.berth.v1 import types_pb2 as pb

GOOD_PORTS = [
    ("int", 8080, (8080, 0, "tcp")),
    ("string", "8080", (8080, 0, "tcp")),
    ("host:container", "80:8080", (8080, 80, "tcp")),
    ("udp", "53/udp", (53, 0, "udp")),
    ("mapping", {"container": 8080, "host": 81}, (8080, 81, "tcp")),
]


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _, v, e in GOOD_PORTS], ids=[i for i, _, _ in GOOD_PORTS]
)
def test_parse_port(value: object, expected: tuple[int, int, str]) -> None:
    p = parse_port(value, "ports[0]")
    assert (p.container_port, p.host_port, p.protocol) == expected


BAD_PORTS = [
    ("too-big", 70000, "ports[0].container: port 70000 is out of range"),
    ("zero", 0, "ports[0].container: port 0 is out of range"),
    ("host-too-big", "70000:80", "ports[0].host: port 70000 is out of range"),
    ("garbage", "http", "ports[0]: cannot parse 'http'"),
    ("bad-proto", {"container": 80, "protocol": "sctp"}, "ports[0].protocol"),
    ("unknown-key", {"contianer": 80}, "unknown field 'contianer'"),
]


@pytest.mark.parametrize(
    ("value", "message"), [(v, m) for _, v, m in BAD_PORTS], ids=[i for i, _, _ in BAD_PORTS]
)
def test_parse_port_rejects(value: object, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_port(value, "ports[0]")


def test_scheduling_fields_and_scalars() -> None:
    spec = from_mapping(
        {
            "name": "a",
            "image": "i",
            "resources": {"cpu": 1, "gpu": 2, "disk": "10Gi"},
            "constraints": ["zone in (a, b)", {"key": "env", "values": ["x"]}],
            "max_per_node": 1,
            "spread": "zone",
            "strategy": "spread",
        }
    )
    assert dict(spec.resources.scalars) == {"gpu": 2, "disk": 10 * 2**30}
    assert [(c.op, list(c.values)) for c in spec.constraints] == [("in", ["a", "b"]), ("in", ["x"])]
    assert spec.max_per_node == 1 and list(spec.spread) == ["zone"] and spec.strategy == pb.STRATEGY_SPREAD


def test_parse_constraint_forms() -> None:
    assert parse_constraint("env==prod", "c") == pb.Constraint(key="env", op="==", value="prod")
    assert parse_constraint("zone != eu", "c") == pb.Constraint(key="zone", op="!=", value="eu")
    with pytest.raises(InputError, match="constraints\\[0\\]: cannot parse"):
        parse_constraint("env=prod", "constraints[0]")


def test_from_mapping_full_spec() -> None:
    spec = from_mapping(
        {
            "name": "portal",
            "image": "reg:5000/portal:1.0",
            "replicas": 6,
            "resources": {"cpu": "250m", "memory": "64Mi"},
            "ports": [8080],
            "env": {"MODE": "demo", "N": 3},
            "constraints": ["env==prod"],
            "args": ["httpd", "-f"],
            "network": "bridge",
            "restart": "on-failure",
        }
    )
    assert spec.replicas == 6
    assert spec.resources.cpu_millis == 250
    assert spec.resources.memory_bytes == 64 * 2**20
    assert spec.env["N"] == "3"
    assert spec.restart == pb.RESTART_POLICY_ON_FAILURE
    assert list(spec.args) == ["httpd", "-f"]


BAD_SPECS = [
    ("negative-replicas", {"name": "a", "image": "i", "replicas": -1}, "replicas: must be 0 or more, got -1"),
    ("string-replicas", {"name": "a", "image": "i", "replicas": "many"}, "replicas: must be a whole number"),
    (
        "bad-memory",
        {"name": "a", "image": "i", "resources": {"memory": "lots"}},
        "resources.memory: cannot parse 'lots'",
    ),
    (
        "bad-cpu",
        {"name": "a", "image": "i", "resources": {"cpu": "fast"}},
        "resources.cpu: cannot parse 'fast'",
    ),
    ("unknown-field", {"name": "a", "image": "i", "replica": 3}, "replica: unknown field"),
    (
        "bad-scalar",
        {"name": "a", "image": "i", "resources": {"gpu": "lots"}},
        "resources.gpu: cannot parse 'lots'",
    ),
    ("bad-strategy", {"name": "a", "image": "i", "strategy": "random"}, "strategy: 'random' is not one of"),
    ("bad-spread", {"name": "a", "image": "i", "spread": {"zone": 1}}, "spread: must be a label key"),
    (
        "in-without-values",
        {"name": "a", "image": "i", "constraints": [{"key": "zone", "op": "in"}]},
        "constraints[0].values",
    ),
    ("bad-network", {"name": "a", "image": "i", "network": "overlay"}, "network: 'overlay' is not one of"),
    ("ports-not-list", {"name": "a", "image": "i", "ports": 8080}, "ports: must be a list"),
    ("not-mapping", ["name"], "must be a mapping"),
]


@pytest.mark.parametrize(
    ("data", "message"), [(d, m) for _, d, m in BAD_SPECS], ids=[i for i, _, _ in BAD_SPECS]
)
def test_from_mapping_rejects(data: object, message: str) -> None:
    with pytest.raises(InputError) as info:
        from_mapping(data)
    assert message in str(info.value)


def test_load_file_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: portal\nimage: [unclosed\n")
    with pytest.raises(InputError, match=r"malformed YAML at line \d+"):
        load_file(path)


def test_load_file_several_documents(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("name: a\nimage: i\n---\nname: b\nimage: i\nreplicas: 2\n")
    assert [s.name for s in load_file(path)] == ["a", "b"]
