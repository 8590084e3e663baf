"""Turn flags and YAML files into a ``ServiceSpec``, with one clear error per mistake.

The controller validates every spec again (it is the authority); this module catches what only
the CLI can see: YAML syntax, unknown fields, wrong types, unparseable quantities and ports.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from berth.cli.errors import InputError
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

FIELDS = (
    "name",
    "image",
    "replicas",
    "resources",
    "ports",
    "env",
    "constraints",
    "args",
    "network",
    "restart",
    "pids_limit",
    "on_disconnect",
    "max_per_node",
    "spread",
    "strategy",
)
STRATEGIES = {"binpack": pb.STRATEGY_BINPACK, "spread": pb.STRATEGY_SPREAD}
ON_DISCONNECT = {"keep": pb.ON_DISCONNECT_KEEP, "stop": pb.ON_DISCONNECT_STOP}
RESOURCE_FIELDS = ("cpu", "memory")
PORT_FIELDS = ("container", "host", "protocol")
NETWORKS = {"bridge": pb.NETWORK_MODE_BRIDGE, "host": pb.NETWORK_MODE_HOST}
RESTARTS = {
    "always": pb.RESTART_POLICY_ALWAYS,
    "on-failure": pb.RESTART_POLICY_ON_FAILURE,
    "never": pb.RESTART_POLICY_NEVER,
}
_PORT_RE = re.compile(r"^(?:(\d+):)?(\d+)(?:/(tcp|udp))?$")
_IN_RE = re.compile(r"^\s*([^\s=!]+)\s+in\s*\((.*)\)\s*$")
_CONSTRAINT_RE = re.compile(r"^\s*([^=!\s]+)\s*(==|!=)\s*(.+?)\s*$")


def parse_replicas(value: Any, field: str = "replicas") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field}: must be a whole number, got {value!r}")
    if value < 0:
        raise InputError(f"{field}: must be 0 or more, got {value}")
    if value > 10000:
        raise InputError(f"{field}: must be at most 10000, got {value}")
    return value


def parse_port(value: Any, field: str) -> pb.PortSpec:
    """``8080`` (dynamic host port), ``"80:8080"``, ``"8080/udp"`` or ``{container, host, protocol}``."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(PORT_FIELDS)
        if unknown:
            raise InputError(f"{field}: unknown field {sorted(unknown)[0]!r}; use container, host, protocol")
        container = value.get("container")
        host = value.get("host", 0)
        protocol = value.get("protocol", "tcp")
    elif isinstance(value, bool):
        raise InputError(f'{field}: {value!r} is not a port; use 8080, "80:8080" or "8080/udp"')
    elif isinstance(value, int):
        container, host, protocol = value, 0, "tcp"
    else:
        match = _PORT_RE.match(str(value).strip())
        if not match:
            raise InputError(
                f"{field}: cannot parse {value!r}; use CONTAINER, HOST:CONTAINER or CONTAINER/udp"
            )
        container, host, protocol = int(match[2]), int(match[1] or 0), match[3] or "tcp"
    for part, number in (("container", container), ("host", host)):
        if isinstance(number, bool) or not isinstance(number, int):
            raise InputError(f"{field}.{part}: must be a port number, got {number!r}")
        if number < 0 or number > 65535 or (part == "container" and number == 0):
            raise InputError(f"{field}.{part}: port {number} is out of range; use 1-65535")
    if protocol not in ("tcp", "udp"):
        raise InputError(f"{field}.protocol: {protocol!r} is not tcp or udp")
    assert isinstance(container, int) and isinstance(host, int)  # checked above
    return pb.PortSpec(container_port=container, host_port=host, protocol=protocol)


def parse_constraint(value: Any, field: str) -> pb.Constraint:
    """``env==prod``, ``zone!=eu``, ``zone in (a, b)`` or ``{key, op, value | values}``."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"key", "op", "value", "values"}
        if unknown:
            raise InputError(f"{field}: unknown field {sorted(unknown)[0]!r}; use key, op, value or values")
        if "key" not in value:
            raise InputError(f"{field}: missing 'key'; use {{key, op, value}} or \"key==value\"")
        op = str(value.get("op", "in" if "values" in value else "=="))
        if op == "in":
            values = value.get("values")
            if not isinstance(values, list) or not values:
                raise InputError(f"{field}.values: op 'in' needs a non-empty list of values")
            return pb.Constraint(key=str(value["key"]), op="in", values=[str(v) for v in values])
        if "value" not in value:
            raise InputError(f"{field}.value: op {op!r} needs a value")
        return pb.Constraint(key=str(value["key"]), op=op, value=str(value["value"]))
    text = str(value)
    match = _IN_RE.match(text)
    if match:
        values = [v.strip() for v in match[2].split(",") if v.strip()]
        if not values:
            raise InputError(f"{field}: {text!r} lists no values; use e.g. zone in (a, b)")
        return pb.Constraint(key=match[1], op="in", values=values)
    match = _CONSTRAINT_RE.match(text)
    if not match:
        raise InputError(f"{field}: cannot parse {value!r}; use KEY==VALUE, KEY!=VALUE or KEY in (A, B)")
    return pb.Constraint(key=match[1], op=match[2], value=match[3])


def parse_resource(item: str, field: str) -> tuple[str, int]:
    """``gpu=2`` or ``disk=100Gi`` (named scalar resources; sizes are bytes)."""
    name, sep, amount = item.partition("=")
    if not sep or not name:
        raise InputError(f"{field}: {item!r} is not NAME=AMOUNT, e.g. gpu=1 or disk=10Gi")
    return name.strip(), quantity(f"{field} {name}", amount, parse_memory)


def parse_env(items: list[str], field: str = "env") -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{field}: {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def _resources(value: Any) -> pb.Resources:
    if not isinstance(value, Mapping):
        raise InputError("resources: must be a mapping like {cpu: 250m, memory: 64Mi}")
    res = pb.Resources()
    for name, amount in value.items():  # anything but cpu and memory is a named scalar resource
        if name not in RESOURCE_FIELDS:
            res.scalars[str(name)] = quantity(f"resources.{name}", amount, parse_memory)
    if "cpu" in value:
        res.cpu_millis = quantity("resources.cpu", value["cpu"], parse_cpu)
    if "memory" in value:
        res.memory_bytes = quantity("resources.memory", value["memory"], parse_memory)
    return res


def quantity(field: str, value: Any, parse: Any) -> int:
    try:
        return int(parse(value))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{field}: {exc}") from None


def choice(field: str, value: Any, choices: Mapping[str, int]) -> int:
    if value not in choices:
        raise InputError(f"{field}: {value!r} is not one of {', '.join(choices)}")
    return choices[value]


def from_mapping(data: Any, source: str = "spec") -> pb.ServiceSpec:
    """Build a spec from a parsed YAML document."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: must be a mapping of fields (name, image, replicas, ...)")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise InputError(f"{unknown[0]}: unknown field in {source}; known fields: {', '.join(FIELDS)}")
    spec = pb.ServiceSpec()
    for key in ("name", "image"):
        if key in data:
            if not isinstance(data[key], str):
                raise InputError(f"{key}: must be a string, got {data[key]!r}")
            setattr(spec, key, data[key])
    spec.replicas = parse_replicas(data.get("replicas", 1))
    if "resources" in data:
        spec.resources.CopyFrom(_resources(data["resources"]))
    for name, kind in (("ports", list), ("constraints", list), ("args", list), ("env", Mapping)):
        if name in data and not isinstance(data[name], kind):
            raise InputError(f"{name}: must be a {'list' if kind is list else 'mapping'}")
    spec.ports.extend(parse_port(p, f"ports[{i}]") for i, p in enumerate(data.get("ports", [])))
    spec.constraints.extend(
        parse_constraint(c, f"constraints[{i}]") for i, c in enumerate(data.get("constraints", []))
    )
    spec.args.extend(str(a) for a in data.get("args", []))
    for k, v in data.get("env", {}).items():
        spec.env[str(k)] = "" if v is None else str(v)
    if "network" in data:
        spec.network = choice("network", data["network"], NETWORKS)  # type: ignore[assignment]
    if "restart" in data:
        spec.restart = choice("restart", data["restart"], RESTARTS)  # type: ignore[assignment]
    if "on_disconnect" in data:
        spec.on_disconnect = choice("on_disconnect", data["on_disconnect"], ON_DISCONNECT)  # type: ignore[assignment]
    if "max_per_node" in data:
        spec.max_per_node = parse_replicas(data["max_per_node"], "max_per_node")
    if "spread" in data:
        spread = data["spread"]
        spread = [spread] if isinstance(spread, str) else spread
        if not isinstance(spread, list):
            raise InputError("spread: must be a label key or a list of label keys, e.g. zone")
        spec.spread.extend(str(k) for k in spread)
    if "strategy" in data:
        spec.strategy = choice("strategy", data["strategy"], STRATEGIES)  # type: ignore[assignment]
    if "pids_limit" in data:
        spec.pids_limit = parse_replicas(data["pids_limit"], "pids_limit")
    return spec


def load_file(path: Path) -> list[pb.ServiceSpec]:
    """Read one or more specs (YAML documents separated by ``---``)."""
    try:
        text = path.read_text() if str(path) != "-" else sys.stdin.read()
    except OSError as exc:
        raise InputError(f"-f: cannot read {path}: {exc.strerror}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: malformed YAML{where}: {problem}") from None
    if not documents:
        raise InputError(f"{path}: no service spec found")
    return [from_mapping(d, str(path)) for d in documents]
