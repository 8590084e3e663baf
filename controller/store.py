"""The controller's only door to etcd: key layout, codec and guarded batched writes.

Everything Berth knows lives under one prefix (default ``/berth/``)::

    <prefix>services/<name>          Service      (spec + generation)
    <prefix>tasks/<service>/<slot>   Task         (desired state of one slot)
    <prefix>status/<task-id>         TaskStatus   (what the agent observed; written on change)
    <prefix>nodes/<node-id>          Node         (capacity, labels, availability, state)
    <prefix>retiring/<task-id>       Task         (an old task kept running until its replacement
                                                   runs: drain moves work replacement-first)

Values are protobuf messages encoded as JSON, so ``etcdctl get --prefix /berth/`` is readable.
Writes that depend on what was read carry the ``mod_revision`` they read (0 = "must not exist")
and are committed in transactions of at most ``MAX_TXN_OPS`` operations; a failed comparison raises
``ConflictError`` and writes nothing of that transaction.

Errors: ``StoreError`` (etcd unreachable or failing; retryable) and its subclass ``ConflictError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
from aetcd import rpc
from google.protobuf import json_format
from google.protobuf.message import Message

from berth.controller.record_json import encode
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
TXNS_IN_FLIGHT = 8  # a large commit keeps this many transactions open at once
M = TypeVar("M", bound=Message)
T = TypeVar("T")


class StoreError(Exception):
    """etcd could not be reached or refused a request; callers may retry."""

    retryable = True


class ConflictError(StoreError):
    """A guarded write found a revision other than the one it read; nothing was written."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The key layout under one prefix."""

    prefix: str = "/berth/"

    def service(self, name: str) -> str:
        return f"{self.prefix}services/{name}"

    def task(self, service: str, slot: int) -> str:
        return f"{self.prefix}tasks/{service}/{slot}"

    def status(self, task_id: str) -> str:
        return f"{self.prefix}status/{task_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}nodes/{node_id}"

    def retiring_task(self, task_id: str) -> str:
        return f"{self.prefix}retiring/{task_id}"

    # the table prefixes, made once: every cached write is routed by them
    services: str = field(init=False, repr=False, compare=False)
    tasks: str = field(init=False, repr=False, compare=False)
    statuses: str = field(init=False, repr=False, compare=False)
    nodes: str = field(init=False, repr=False, compare=False)
    retiring: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, part in (
            ("services", "services/"),
            ("tasks", "tasks/"),
            ("statuses", "status/"),
            ("nodes", "nodes/"),
            ("retiring", "retiring/"),
        ):
            object.__setattr__(self, name, f"{self.prefix}{part}")


def decode(data: bytes, message_type: type[M]) -> M:
    message = message_type()
    json_format.Parse(data, message, ignore_unknown_fields=True)
    return message


@dataclass(frozen=True, slots=True)
class Stored(Generic[T]):
    """A decoded value with the revision it was last modified at (for guarded writes)."""

    value: T
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: Message
    expect_revision: int | None = None  # None: unguarded; 0: must not exist; n: must be at n
    with_next: bool = False  # commit in the same transaction as the op after it


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    expect_revision: int | None = None
    with_next: bool = False  # commit in the same transaction as the op after it


Op = Put | Delete
BatchCallback = Callable[[Sequence[Op], dict[str, int]], None]


@dataclass(slots=True)
class Loaded:
    """Everything under the prefix at one revision (the start point for caches)."""

    revision: int
    services: dict[str, Stored[pb.Service]] = field(default_factory=dict)
    tasks: dict[str, Stored[pb.Task]] = field(default_factory=dict)  # by task key
    statuses: dict[str, Stored[pb.TaskStatus]] = field(default_factory=dict)  # by task id
    nodes: dict[str, Stored[pb.Node]] = field(default_factory=dict)  # by node id
    retiring: dict[str, Stored[pb.Task]] = field(default_factory=dict)  # by task id


def _describe(exc: BaseException) -> str:
    """One short line for an etcd client failure (gRPC errors carry long debug strings)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _groups(ops: Sequence[Op]) -> Iterator[Sequence[Op]]:
    """Runs of ops chained by ``with_next`` (most are alone)."""
    start = 0
    for i, op in enumerate(ops):
        if not op.with_next:
            yield ops[start : i + 1]
            start = i + 1
    if start < len(ops):
        yield ops[start:]


def _chunks(ops: Sequence[Op], size: int) -> Iterator[Sequence[Op]]:
    """Transactions of at most ``size`` ops that never split a ``with_next`` group."""
    if not any(op.with_next for op in ops):
        for start in range(0, len(ops), size):
            yield ops[start : start + size]
        return
    chunk: list[Op] = []
    for group in _groups(ops):
        if len(group) > size:
            raise ValueError(f"{len(group)} ops must commit together; a transaction takes {size}")
        if len(chunk) + len(group) > size:
            yield chunk
            chunk = []
        chunk.extend(group)
    if chunk:
        yield chunk


class Store:
    """Async etcd adapter. One instance per controller process."""

    def __init__(self, endpoint: str, prefix: str = "/berth/", timeout: float = 5.0) -> None:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parts.hostname:
            raise ValueError(f"--etcd: cannot parse {endpoint!r}; use e.g. http://127.0.0.1:2379")
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"--prefix: {prefix!r} must start and end with '/'")
        self.keys = Keys(prefix)
        self.endpoint = endpoint
        self._client = aetcd.Client(host=parts.hostname, port=parts.port or 2379, timeout=timeout)

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> int:
        """Return etcd's current revision; raises StoreError when etcd is unreachable."""
        try:
            await self._client.connect()
            response = await self._client.kvstub.Range(
                rpc.RangeRequest(key=self.keys.prefix.encode(), limit=1, keys_only=True),
                timeout=self._client._timeout,
            )
            return int(response.header.revision)
        except Exception as exc:  # aetcd errors, or grpc.aio.AioRpcError from the raw stub
            raise StoreError(f"etcd at {self.endpoint} unreachable ({_describe(exc)})") from exc

    async def load(self) -> Loaded:
        """Read everything under the prefix in one consistent range read."""
        try:
            result = await self._client.get_prefix(self.keys.prefix.encode())
        except aetcd.exceptions.ClientError as exc:
            raise StoreError(f"etcd at {self.endpoint} unreachable ({_describe(exc)})") from exc
        loaded = Loaded(revision=int(result.header.revision))
        for kv in result:
            key = kv.key.decode()
            rev = int(kv.mod_revision)
            if key.startswith(self.keys.services):
                loaded.services[key.removeprefix(self.keys.services)] = Stored(
                    decode(kv.value, pb.Service), rev
                )
            elif key.startswith(self.keys.tasks):
                loaded.tasks[key] = Stored(decode(kv.value, pb.Task), rev)
            elif key.startswith(self.keys.statuses):
                loaded.statuses[key.removeprefix(self.keys.statuses)] = Stored(
                    decode(kv.value, pb.TaskStatus), rev
                )
            elif key.startswith(self.keys.nodes):
                loaded.nodes[key.removeprefix(self.keys.nodes)] = Stored(decode(kv.value, pb.Node), rev)
            elif key.startswith(self.keys.retiring):
                loaded.retiring[key.removeprefix(self.keys.retiring)] = Stored(decode(kv.value, pb.Task), rev)
        return loaded

    async def commit(self, ops: Sequence[Op], on_batch: BatchCallback | None = None) -> dict[str, int]:
        """Apply ops in guarded transactions of at most MAX_TXN_OPS each.

        Returns the new mod_revision of every written key (deleted keys map to 0). A batch
        whose guard fails raises ConflictError; other batches stay committed, so callers
        batch only independent writes together (each guard covers its own key), and chain with
        ``with_next`` the ops that must commit, or fail, together.
        ``on_batch(batch, revisions)`` is called as each transaction commits, before the next
        ones finish: when a later one fails (or the call is cancelled), the caller still knows
        exactly what is durable and loses none of it. It runs on the event loop that encodes the
        next transactions, so it should be quick (the controller only notes the batch, and folds
        them all once the call ends).

        When every key appears once, up to ``TXNS_IN_FLIGHT`` transactions are open at a time:
        the next batch is encoded while etcd commits the previous ones, and etcd folds
        concurrent transactions into fewer disk syncs. A key written twice keeps the order.
        """
        written: dict[str, int] = {}

        def done(batch: Sequence[Op], revision: int) -> None:
            revisions = {op.key: revision if isinstance(op, Put) else 0 for op in batch}
            written.update(revisions)
            if on_batch is not None:
                on_batch(batch, revisions)

        batches = list(_chunks(ops, MAX_TXN_OPS))
        if len(batches) == 1 or len({op.key for op in ops}) != len(ops):
            for batch in batches:
                done(batch, await self._commit_batch(batch))
            return written
        slots = asyncio.Semaphore(TXNS_IN_FLIGHT)

        async def one(batch: Sequence[Op]) -> None:
            async with slots:
                done(batch, await self._commit_batch(batch))

        results = await asyncio.gather(*(one(b) for b in batches), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise next((e for e in errors if isinstance(e, ConflictError)), errors[0])
        return written

    async def _commit_batch(self, batch: Sequence[Op]) -> int:
        # built in place (add() and field sets): nested constructors copy every submessage,
        # three times the cost per key at 100,000 keys a pass
        txn = rpc.TxnRequest()
        compare, success = txn.compare.add, txn.success.add
        for op in batch:
            key = op.key.encode()
            if op.expect_revision is not None:
                compare(
                    result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=op.expect_revision
                )
            if isinstance(op, Put):
                put = success().request_put
                put.key = key
                put.value = encode(op.value)
            else:
                success().request_delete_range.key = key
        try:
            await self._client.connect()
            response = await self._client.kvstub.Txn(txn, timeout=self._client._timeout)
        except aetcd.exceptions.ClientError as exc:
            raise StoreError(f"etcd at {self.endpoint} failed a write ({_describe(exc)})") from exc
        except Exception as exc:  # grpc.aio.AioRpcError escapes aetcd's wrapper on raw stub calls
            raise StoreError(f"etcd at {self.endpoint} failed a write ({_describe(exc)})") from exc
        if not response.succeeded:
            raise ConflictError(f"concurrent change to one of {[op.key for op in batch][:3]}...")
        return int(response.header.revision)
