"""Service spec validation: the first problem found, naming the field and how to fix it.

``validate_spec(spec)`` checks, in this order: name, image, replicas, resources, ports, env,
constraints, pids_limit, max_per_node, spread, strategy, and raises :class:`SpecError` for the
first problem. Field paths follow the protobuf field names: ``ports[1].container_port``,
``constraints[0].op``, ``constraints[0].values[1]``, ``env.FOO-BAR``, ``resources.memory_bytes``,
``resources.scalars.gpu``, ``spread[0]``. Map keys are checked in sorted order so the
first problem is the same on every run.

Errors: ``SpecError`` is an ``InvalidError`` (so the API maps it to INVALID_ARGUMENT) and a
``ValueError``; ``str(err)`` is ``"<field>: <message>"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from berth.proto.berth.v1 import types_pb2

from .errors import InvalidError

MAX_REPLICAS = 10_000
MAX_CPU_MILLIS = 1_000_000
MIN_MEMORY_BYTES = 4 * 1024 * 1024
"""runc cannot start a container with a smaller memory limit."""
MAX_PORT = 65_535
PROTOCOLS = ("tcp", "udp")
CONSTRAINT_OPS = ("==", "!=", "in")
MAX_PER_NODE = 10_000
STRATEGIES = (types_pb2.STRATEGY_UNSPECIFIED, types_pb2.STRATEGY_BINPACK, types_pb2.STRATEGY_SPREAD)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DOMAIN_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[0-9a-f]{64})?$"
)
"""A plausible ``[registry[:port]/]name[:tag][@sha256:digest]``, after Docker's reference grammar."""
SCALAR_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
# requested through their own fields; as scalar names they would be a second, unrelated dimension
BUILT_IN_RESOURCES = {"cpu": "cpu_millis", "memory": "memory_bytes"}
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")

_NAME_RULE = (
    "use lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
)
_IMAGE_RULE = "use [registry[:port]/]name[:tag][@sha256:<64 hex digits>], e.g. 'nginx:1.27'"


class SpecError(InvalidError, ValueError):
    """A service spec is invalid; ``field`` is the path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_spec(spec: types_pb2.ServiceSpec) -> None:
    """Raise :class:`SpecError` for the first problem in ``spec``; return quietly if it is valid."""
    _check_name(spec.name)
    _check_image(spec.image)
    _check_replicas(spec.replicas)
    _check_resources(spec.resources)
    _check_ports(spec.ports, host_network=spec.network == types_pb2.NETWORK_MODE_HOST)
    _check_env(spec.env)
    _check_constraints(spec.constraints)
    _check_pids_limit(spec.pids_limit)
    _check_max_per_node(spec.max_per_node)
    _check_spread(spec.spread)
    _check_strategy(spec.strategy)


def _check_name(name: str) -> None:
    if not name:
        raise SpecError("name", f"required; {_NAME_RULE}")
    if not NAME_RE.fullmatch(name):
        raise SpecError("name", f"{name!r} is not valid; {_NAME_RULE}")


def _check_image(image: str) -> None:
    if not image:
        raise SpecError("image", f"required; {_IMAGE_RULE}")
    if not IMAGE_RE.fullmatch(image):
        raise SpecError("image", f"{image!r} is not a valid image reference; {_IMAGE_RULE}")


def _check_replicas(replicas: int) -> None:
    if not 0 <= replicas <= MAX_REPLICAS:
        raise SpecError("replicas", f"must be between 0 and {MAX_REPLICAS}, got {replicas}")


def _check_resources(resources: types_pb2.Resources) -> None:
    cpu, memory = resources.cpu_millis, resources.memory_bytes
    if not 0 <= cpu <= MAX_CPU_MILLIS:
        raise SpecError(
            "resources.cpu_millis", f"must be between 0 and {MAX_CPU_MILLIS} (1000 = one core), got {cpu}"
        )
    if memory < 0:
        raise SpecError("resources.memory_bytes", f"must be 0 (no limit) or positive, got {memory}")
    if 0 < memory < MIN_MEMORY_BYTES:
        raise SpecError(
            "resources.memory_bytes",
            f"must be 0 (no limit) or at least {MIN_MEMORY_BYTES} (4 MiB), got {memory}; "
            "runc cannot start a container with less",
        )
    _check_scalars(resources.scalars)


def _check_scalars(scalars: Mapping[str, int]) -> None:
    for name in sorted(scalars):
        field = f"resources.scalars.{name}"
        if not SCALAR_RE.fullmatch(name):
            raise SpecError(
                field,
                f"{name!r} is not a valid resource name; use lowercase letters, digits, '_', '.', '-', "
                "starting with a letter",
            )
        if name in BUILT_IN_RESOURCES:
            raise SpecError(
                field,
                f"{name} is not a named resource; set resources.{BUILT_IN_RESOURCES[name]} "
                f"(--{name} on the command line, {name}: in a spec file)",
            )
        if scalars[name] < 1:
            raise SpecError(field, f"must be at least 1, got {scalars[name]}; leave it out to request none")


def _check_ports(ports: Sequence[types_pb2.PortSpec], *, host_network: bool) -> None:
    container_seen: dict[tuple[str, int], int] = {}
    host_seen: dict[tuple[str, int], int] = {}
    for i, port in enumerate(ports):
        _check_port_ranges(i, port)
        protocol = port.protocol or "tcp"
        _check_unique(f"ports[{i}].container_port", container_seen, (protocol, port.container_port), i)
        if port.host_port:
            _check_unique(f"ports[{i}].host_port", host_seen, (protocol, port.host_port), i)
        if host_network and port.host_port not in (0, port.container_port):
            raise SpecError(
                f"ports[{i}].host_port",
                f"with network HOST the container listens on the host itself, so host_port must be 0 or "
                f"equal container_port ({port.container_port}), got {port.host_port}",
            )


def _check_port_ranges(i: int, port: types_pb2.PortSpec) -> None:
    if not 1 <= port.container_port <= MAX_PORT:
        raise SpecError(
            f"ports[{i}].container_port", f"must be between 1 and {MAX_PORT}, got {port.container_port}"
        )
    if port.host_port > MAX_PORT:
        raise SpecError(
            f"ports[{i}].host_port",
            f"must be 0 (a free port is chosen) or between 1 and {MAX_PORT}, got {port.host_port}",
        )
    if port.protocol not in ("", *PROTOCOLS):
        raise SpecError(f"ports[{i}].protocol", f"must be 'tcp' or 'udp', got {port.protocol!r}")


def _check_unique(field: str, seen: dict[tuple[str, int], int], key: tuple[str, int], i: int) -> None:
    if key in seen:
        protocol, number = key
        raise SpecError(
            field, f"{protocol}/{number} is already used by ports[{seen[key]}]; use each port once"
        )
    seen[key] = i


def _check_env(env: Mapping[str, str]) -> None:
    for key in sorted(env):
        if not ENV_KEY_RE.fullmatch(key):
            raise SpecError(
                f"env.{key}",
                f"{key!r} is not a valid variable name; "
                "use letters, digits and '_', not starting with a digit",
            )


def _check_constraints(constraints: Sequence[types_pb2.Constraint]) -> None:
    for i, constraint in enumerate(constraints):
        path = f"constraints[{i}]"
        if not constraint.key:
            raise SpecError(f"{path}.key", "required; name a node label, e.g. 'env'")
        _check_label_key(f"{path}.key", constraint.key)
        if constraint.op not in CONSTRAINT_OPS:
            raise SpecError(f"{path}.op", f"must be '==', '!=' or 'in', got {constraint.op!r}")
        if constraint.op == "in":
            _check_in_values(path, constraint.values)
        elif not constraint.value:
            raise SpecError(f"{path}.value", "required; the label value to compare with, e.g. 'prod'")


def _check_in_values(path: str, values: Sequence[str]) -> None:
    if not values:
        raise SpecError(
            f"{path}.values", "required with op 'in'; list the accepted label values, e.g. [a, b]"
        )
    for j, value in enumerate(values):
        if not value:
            raise SpecError(f"{path}.values[{j}]", "must not be empty; list label values, e.g. 'a'")


def _check_label_key(field: str, key: str) -> None:
    if not LABEL_KEY_RE.fullmatch(key):
        raise SpecError(
            field,
            f"{key!r} is not a valid label key; use letters, digits, '_', '.', '/', '-', "
            "starting with a letter or digit",
        )


def _check_pids_limit(pids_limit: int) -> None:
    if pids_limit < 0:
        raise SpecError("pids_limit", f"must be 0 (the default, 512) or positive, got {pids_limit}")


def _check_max_per_node(max_per_node: int) -> None:
    if not 0 <= max_per_node <= MAX_PER_NODE:
        raise SpecError("max_per_node", f"must be 0 (no limit) or at most {MAX_PER_NODE}, got {max_per_node}")


def _check_spread(spread: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(spread):
        field = f"spread[{i}]"
        if not key:
            raise SpecError(field, "must not be empty; name a node label to spread across, e.g. 'zone'")
        _check_label_key(field, key)
        if key in seen:
            raise SpecError(field, f"{key!r} is already listed at spread[{seen[key]}]; list each label once")
        seen[key] = i


def _check_strategy(strategy: int) -> None:
    if strategy not in STRATEGIES:
        raise SpecError("strategy", f"must be BINPACK or SPREAD (or unset for BINPACK), got {strategy}")
