"""JSON for the records written at every placement: tasks and task statuses.

etcd values are protobuf messages in ``json_format.MessageToJson(indent=None, sort_keys=True)``
form (``etcdctl get`` shows readable JSON). ``json_format`` walks descriptors in Python for every
field of every message, about 15 us for a task record: at 100,000 placements that was a third of
the commit. Tasks and statuses are flat messages whose shape is fixed by the contract, so this
module writes their fields directly (the spec a task embeds is the same for every replica of a
service generation: its JSON is made once by ``json_format`` and spliced in). The output is the
same bytes as ``json_format``'s; anything this module does not expect (a non-finite double, an
enum number without a name) falls back to ``json_format`` itself, and a property test compares
the two on generated messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quote  # what json.dumps uses (ensure_ascii)

from google.protobuf import json_format
from google.protobuf.message import Message

from berth.proto.berth.v1 import types_pb2 as pb

_SPEC_JSON: dict[bytes, str] = {}  # serialized ServiceSpec -> its JSON
_SPEC_JSON_LIMIT = 4096


class _Unusual(Exception):
    """A value this module does not write itself; the caller falls back to json_format."""


def reference(message: Message) -> bytes:
    """The canonical encoding: what every fast path here must equal."""
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def _double(value: float) -> str:
    if not math.isfinite(value):
        raise _Unusual
    return repr(value)


def _present_double(value: float) -> bool:
    # proto3 keeps a double whose bits are not all zero: -0.0 is written, 0.0 is not
    return value != 0.0 or math.copysign(1.0, value) < 0


_STATE_JSON: dict[int, str] = {int(value): _quote(name) for name, value in pb.TaskState.items()}


def _task_state(value: int) -> str:
    found = _STATE_JSON.get(value)
    if found is None:
        raise _Unusual
    return found


def _spec_json(spec: pb.ServiceSpec) -> str:
    # keyed by the wire bytes: equal bytes are an equal spec. Not the deterministic form (twice
    # the cost): two equal specs whose maps serialize in different orders only miss the cache
    key = spec.SerializeToString()
    found = _SPEC_JSON.get(key)
    if found is None:
        if len(_SPEC_JSON) >= _SPEC_JSON_LIMIT:
            _SPEC_JSON.clear()
        found = _SPEC_JSON[key] = json_format.MessageToJson(spec, indent=None, sort_keys=True)
    return found


def _port(p: pb.PortMapping) -> str:
    parts = []
    if p.container_port:
        parts.append(f'"containerPort": {p.container_port}')
    if p.host_port:
        parts.append(f'"hostPort": {p.host_port}')
    if p.protocol:
        parts.append(f'"protocol": {_quote(p.protocol)}')
    return "{" + ", ".join(parts) + "}"


def _task(t: pb.Task) -> str:
    assigned, created, state, node_id = t.assigned_at, t.created_at, t.desired_state, t.node_id
    if assigned and created and state and node_id and not t.pending_reason and not t.ports:
        # the shape of every placed task, in one format (fields in json_format's sorted order;
        # the remaining ones are checked as it goes and the general path takes any other shape)
        task_id, service, slot, generation = t.id, t.service, t.slot, t.spec_generation
        if task_id and service and slot and generation and t.HasField("spec"):
            return (
                f'{{"assignedAt": {_double(assigned)}, "createdAt": {_double(created)}, '
                f'"desiredState": {_task_state(state)}, "id": {_quote(task_id)}, '
                f'"nodeId": {_quote(node_id)}, "service": {_quote(service)}, "slot": {slot}, '
                f'"spec": {_spec_json(t.spec)}, "specGeneration": "{generation}"}}'
            )
    parts = []
    if _present_double(t.assigned_at):
        parts.append(f'"assignedAt": {_double(t.assigned_at)}')
    if _present_double(t.created_at):
        parts.append(f'"createdAt": {_double(t.created_at)}')
    if t.desired_state:
        parts.append(f'"desiredState": {_task_state(t.desired_state)}')
    if t.id:
        parts.append(f'"id": {_quote(t.id)}')
    if t.node_id:
        parts.append(f'"nodeId": {_quote(t.node_id)}')
    if t.pending_reason:
        parts.append(f'"pendingReason": {_quote(t.pending_reason)}')
    if t.ports:
        parts.append('"ports": [' + ", ".join(_port(p) for p in t.ports) + "]")
    if t.service:
        parts.append(f'"service": {_quote(t.service)}')
    if t.slot:
        parts.append(f'"slot": {t.slot}')
    if t.HasField("spec"):
        parts.append(f'"spec": {_spec_json(t.spec)}')
    if t.spec_generation:
        parts.append(f'"specGeneration": "{t.spec_generation}"')
    return "{" + ", ".join(parts) + "}"


def _status(s: pb.TaskStatus) -> str:
    parts = []
    if s.container_ip:
        parts.append(f'"containerIp": {_quote(s.container_ip)}')
    if s.error:
        parts.append(f'"error": {_quote(s.error)}')
    if s.exit_code:
        parts.append(f'"exitCode": {s.exit_code}')
    if s.image_digest:
        parts.append(f'"imageDigest": {_quote(s.image_digest)}')
    if s.message:
        parts.append(f'"message": {_quote(s.message)}')
    if s.node_id:
        parts.append(f'"nodeId": {_quote(s.node_id)}')
    if s.pid:
        parts.append(f'"pid": {s.pid}')
    if s.restarts:
        parts.append(f'"restarts": {s.restarts}')
    if _present_double(s.started_at):
        parts.append(f'"startedAt": {_double(s.started_at)}')
    if s.state:
        parts.append(f'"state": {_task_state(s.state)}')
    if s.task_id:
        parts.append(f'"taskId": {_quote(s.task_id)}')
    if _present_double(s.updated_at):
        parts.append(f'"updatedAt": {_double(s.updated_at)}')
    return "{" + ", ".join(parts) + "}"


_FAST: dict[type[Message], Callable[[Message], str]] = {
    pb.Task: _task,  # type: ignore[dict-item]
    pb.TaskStatus: _status,  # type: ignore[dict-item]
}


def encode(message: Message) -> bytes:
    """``message`` as the JSON etcd stores (see the module docstring)."""
    fast = _FAST.get(type(message))
    if fast is not None:
        try:
            return fast(message).encode()
        except _Unusual:
            pass
    return reference(message)
