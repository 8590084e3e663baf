"""Controller memory under churn for a long time: does it level off, with the GC tuned as it is?

``python -m bench.soak [--minutes 30] [--nodes 500] [--replicas 10000]``

The controller collects cyclic garbage rarely (``controller/__main__.py``, ``GC_THRESHOLD``): a
pass at 100,000 tasks ran 40 % slower at CPython's default thresholds. The risk of collecting
rarely is memory that only the cyclic collector frees piling up between collections. This bench
runs the real controller and etcd with ``--nodes`` hollow agents (``berth.agent.hollow``) and
repeats one cycle until ``--minutes`` have passed:

1. create service ``soak`` with ``--replicas`` replicas and wait until all run (RUNNING in the
   controller's view, i.e. acknowledged by their agents);
2. scale it to half and wait until half run;
3. remove it and wait until it has no task left;

then, ``--settle`` seconds later (agents stop a removed service's tasks and report it in well
under a second at these sizes), reads the controller's resident memory (``VmRSS``) and, from its
metrics endpoint, how often the collector ran each generation (``python_gc_collections_total``):
a flat memory line with no full (generation 2) collection in it would prove nothing about what
collecting rarely costs. Prints a line per cycle on stderr, a table on stdout and, as the last
stdout line, one JSON object of figures: the RSS after the first and the last cycle, its peak,
its growth per hour fitted (least squares) over the second half of the cycles, when the first
ones have warmed caches and pools, and the collections. Needs only the ``etcd`` binary;
everything is on loopback and removed at the end (``--keep`` keeps the logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.scheduler import (
    Processes,
    cpu_seconds,
    free_port,
    in_work_dir,
    percentile,
    proc_status,
    say,
    start_controller,
    start_etcd,
    wait_nodes_ready,
)
from berth.proto.berth.v1 import cluster_pb2, cluster_pb2_grpc
from berth.proto.berth.v1 import types_pb2 as pb

SERVICE = "soak"


@dataclass(slots=True)
class Cycle:
    at_s: float  # since the first cycle began
    seconds: float
    rss_mb: float
    gc_collections: list[int]  # by generation, since the controller started


@dataclass(slots=True)
class Result:
    nodes: int
    replicas: int
    minutes: float
    cycles: int = 0
    cycle_p50_s: float | None = None
    rss_idle_mb: float = 0.0  # before the first cycle
    rss_first_mb: float | None = None  # after the first cycle
    rss_last_mb: float | None = None
    rss_max_mb: float | None = None
    rss_peak_mb: float = 0.0  # VmHWM: the highest it ever was, during cycles too
    rss_growth_mb_per_hour: float | None = None
    gc_collections: list[int] = field(default_factory=list)  # by generation, over the cycles
    controller_cpu_s: float = 0.0
    note: str = ""
    history: list[Cycle] = field(default_factory=list)


def growth_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, MB)`` points, in MB per hour; None under 2 points or
    when they were all taken at the same moment."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / spread
    return slope * 3600


def gc_collections(metrics_url: str) -> list[int]:
    """``python_gc_collections_total`` of generations 0, 1 and 2 from the controller's metrics."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with direct.open(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = [0, 0, 0]
    for family in text_string_to_metric_families(text):
        if family.name == "python_gc_collections":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[int(sample.labels["generation"])] = int(sample.value)
    return found


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """Poll ``predicate`` every 0.2 s until it is true; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace, procs: Processes, result: Result) -> None:
    etcd = start_etcd(procs)
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    ctl = start_controller(procs, etcd, address, "none", metrics_port=metrics_port)
    say(f"etcd at {etcd}, controller pid {ctl.pid} at {address}")
    argv = [sys.executable, "-m", "berth.agent.hollow", "--controller", address]
    argv += ["--count", str(args.nodes), "--connect-rate", "500"]
    procs.spawn("hollow", argv, stdout_pipe=True)
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    api = cluster_pb2_grpc.ClusterAPIStub(channel)
    try:
        await wait_nodes_ready(api, args.nodes, 120, ctl)
        await asyncio.sleep(2)
        result.rss_idle_mb = round(proc_status(ctl.pid, "VmRSS") / 1024, 1)
        collections0 = await asyncio.to_thread(gc_collections, metrics_url)
        cpu0 = cpu_seconds(ctl.pid)
        start = time.monotonic()
        end = start + args.minutes * 60
        half = max(1, args.replicas // 2)
        spec = pb.ServiceSpec(
            name=SERVICE,
            image="hollow/pause:1",
            replicas=args.replicas,
            resources=pb.Resources(cpu_millis=10, memory_bytes=16 << 20),
        )

        async def running(count: int) -> bool:
            view = await api.GetService(cluster_pb2.GetServiceRequest(name=SERVICE), timeout=30)
            return view.running == count and view.pending == 0

        async def gone() -> bool:  # all services' tasks: asking for a removed one is NOT_FOUND
            tasks = await api.ListTasks(cluster_pb2.ListTasksRequest(), timeout=30)
            return not any(view.task.service == SERVICE for view in tasks.tasks)

        while time.monotonic() < end:
            began = time.monotonic()
            await api.CreateService(cluster_pb2.CreateServiceRequest(spec=spec), timeout=60)
            await until(lambda: running(args.replicas), f"{args.replicas} running", args.timeout)
            await api.ScaleService(cluster_pb2.ScaleServiceRequest(name=SERVICE, replicas=half), timeout=60)
            await until(lambda: running(half), f"{half} running", args.timeout)
            await api.RemoveService(cluster_pb2.RemoveServiceRequest(name=SERVICE), timeout=60)
            await until(gone, "no task left", args.timeout)
            seconds = round(time.monotonic() - began, 2)
            await asyncio.sleep(args.settle)
            cycle = Cycle(
                at_s=round(time.monotonic() - start, 1),
                seconds=seconds,
                rss_mb=round(proc_status(ctl.pid, "VmRSS") / 1024, 1),
                gc_collections=await asyncio.to_thread(gc_collections, metrics_url),
            )
            result.history.append(cycle)
            number = len(result.history)
            say(f"cycle {number} at {cycle.at_s:.0f} s: {cycle.seconds:.1f} s, rss {cycle.rss_mb} MB")
        result.controller_cpu_s = round(cpu_seconds(ctl.pid) - cpu0, 1)
        if result.history:
            last = result.history[-1].gc_collections
            result.gc_collections = [n - n0 for n, n0 in zip(last, collections0, strict=True)]
        # the kernel updates the high-water mark lazily: it can trail an RSS read just before
        hwm = round(proc_status(ctl.pid, "VmHWM") / 1024, 1)
        result.rss_peak_mb = max([hwm, *(c.rss_mb for c in result.history)])
    finally:
        await channel.close()
    summarize(result)


def summarize(result: Result) -> None:
    history = result.history
    result.cycles = len(history)
    if not history:
        return
    result.cycle_p50_s = percentile([c.seconds for c in history], 50)
    result.rss_first_mb = history[0].rss_mb
    result.rss_last_mb = history[-1].rss_mb
    result.rss_max_mb = max(c.rss_mb for c in history)
    second_half = history[len(history) // 2 :]
    slope = growth_per_hour([(c.at_s, c.rss_mb) for c in second_half])
    result.rss_growth_mb_per_hour = None if slope is None else round(slope, 1)


def table(result: Result) -> str:
    def fmt(v: float | None, unit: str) -> str:
        return "-" if v is None else f"{v:,.1f}{unit}"

    rows = [
        ("hollow nodes / replicas per cycle", f"{result.nodes:,} / {result.replicas:,}"),
        ("cycles / minutes", f"{result.cycles} / {result.minutes:g}"),
        ("cycle p50", fmt(result.cycle_p50_s, " s")),
        ("controller RSS idle, before", fmt(result.rss_idle_mb, " MB")),
        (
            "RSS after first / last cycle",
            f"{fmt(result.rss_first_mb, ' MB')} / {fmt(result.rss_last_mb, ' MB')}",
        ),
        (
            "RSS max between cycles / peak",
            f"{fmt(result.rss_max_mb, ' MB')} / {fmt(result.rss_peak_mb, ' MB')}",
        ),
        ("RSS growth, second half", fmt(result.rss_growth_mb_per_hour, " MB/hour")),
        ("GC runs, generation 0 / 1 / 2", " / ".join(str(n) for n in result.gc_collections) or "-"),
        ("controller CPU", fmt(result.controller_cpu_s, " s")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if result.note:
        lines.append(f"{'note'.ljust(width)}  {result.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="keep cycling this long")
    parser.add_argument("--nodes", type=int, default=500, help="hollow agents")
    parser.add_argument("--replicas", type=int, default=10_000, help="replicas of the service each cycle")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on one step after this long")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after a cycle before reading")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.nodes <= 0 or args.replicas <= 0 or args.settle < 0:
        parser.error("--minutes, --nodes and --replicas must be positive, --settle at least 0")
    result = Result(nodes=args.nodes, replicas=args.replicas, minutes=args.minutes)
    failed, error = in_work_dir("berth-bench-soak-", args.keep, lambda procs: run(args, procs, result))
    if failed:
        summarize(result)
        result.note = "interrupted" if error is None else error
    print(table(result))
    figures = asdict(result)
    figures["history"] = [asdict(c) for c in result.history]
    print(json.dumps(figures))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
