"""The etcd write ceiling for Berth's write pattern: batched puts, a few transactions in flight.

``python -m bench.etcd_ceiling --etcd http://127.0.0.1:2379 [--keys 100000] [--value-size 600]``

Writes ``--keys`` keys of ``--value-size`` bytes under ``--prefix`` (default ``/ceiling/``) in
transactions of ``--batch`` (128, etcd's default ``--max-txn-ops`` and the controller's
``MAX_TXN_OPS``) puts, ``--in-flight`` (8, the store's ``TXNS_IN_FLIGHT``) transactions open at a
time — how the controller's store commits a large batch — through aetcd's KV stub, then deletes the
prefix. Prints keys/s. ``bench.scheduler`` calls
:func:`measure` against its own etcd after the placement run, with the mean size of a placed task
record, so placements/s can be read as a fraction of what etcd takes in that shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import aetcd
from aetcd import rpc

from berth.controller.store import MAX_TXN_OPS, TXNS_IN_FLIGHT

IN_FLIGHT = TXNS_IN_FLIGHT  # measured the way the store commits


@dataclass(frozen=True, slots=True)
class Ceiling:
    keys: int
    value_size: int
    batch: int
    in_flight: int
    seconds: float
    keys_per_s: float
    txns_per_s: float


async def measure(
    endpoint: str,
    *,
    keys: int = 100_000,
    value_size: int = 600,
    batch: int = MAX_TXN_OPS,
    in_flight: int = IN_FLIGHT,
    prefix: str = "/ceiling/",
) -> Ceiling:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    client = aetcd.Client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379, timeout=30)
    await client.connect()
    try:
        value = b"x" * value_size
        base = prefix.encode()
        slots = asyncio.Semaphore(in_flight)

        async def txn(start: int) -> None:
            ops = [
                rpc.RequestOp(request_put=rpc.PutRequest(key=base + b"%08d" % i, value=value))
                for i in range(start, min(keys, start + batch))
            ]
            async with slots:
                await client.kvstub.Txn(rpc.TxnRequest(compare=[], success=ops, failure=[]), timeout=30)

        starts = range(0, keys, batch)
        txns = len(starts)
        started = time.perf_counter()
        await asyncio.gather(*(txn(start) for start in starts))
        seconds = time.perf_counter() - started
        await client.delete_prefix(base)
    finally:
        await client.close()
    return Ceiling(
        keys=keys,
        value_size=value_size,
        batch=batch,
        in_flight=in_flight,
        seconds=round(seconds, 3),
        keys_per_s=round(keys / seconds, 1),
        txns_per_s=round(txns / seconds, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.etcd_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--etcd", default="http://127.0.0.1:2379")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-size", type=int, default=600)
    parser.add_argument("--batch", type=int, default=MAX_TXN_OPS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--prefix", default="/ceiling/")
    args = parser.parse_args()
    result = asyncio.run(
        measure(
            args.etcd,
            keys=args.keys,
            value_size=args.value_size,
            batch=args.batch,
            in_flight=args.in_flight,
            prefix=args.prefix,
        )
    )
    print(
        f"{result.keys_per_s:,.0f} keys/s ({result.keys} keys of {result.value_size} B, "
        f"{result.batch}/txn, {result.in_flight} in flight)"
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
