"""Scheduler throughput at cluster scale: a real controller and etcd, thousands of HOLLOW agents.

``python -m bench.scheduler [--nodes 500] [--tasks 10000]`` (the full size: ``--nodes 5000 --tasks 100000``)

1. Starts a throwaway etcd (loopback, data dir under a temp dir), the real controller as a
   subprocess (``python -m berth.controller --prefix /bench/``) and ``--nodes`` hollow agents
   (``berth.agent.hollow``: real agent sessions over a runtime that runs nothing) in subprocesses of
   ``--agents-per-process`` each, and waits until ``ListNodes`` shows every node ready.
2. Watches the whole prefix in etcd (one raw watch from the bench process) and submits services
   totalling ``--tasks`` replicas (``--services``, default one per 1,000 replicas) through
   ClusterAPI ``CreateService``, all at once.
3. Measures, from the watch (so: committed to etcd), the time from the first submission until
   every task has a node (*placed*) and until every task's observed status is RUNNING (*acked*);
   per service, the *decision latency* (from its CreateService returning until all its replicas are
   committed with a node) and the ack latency (until all are RUNNING); controller peak RSS
   (``VmHWM``) and CPU seconds; the number of status writes. The CPU of every process of the
   run (controller, etcd, hollow agents, the bench) from submission until every task was seen
   running, over the machine's cores in that time, says how busy the machine was
   (``machine_busy_pct``); the controller's and agents' CPU over ``--idle-window`` idle seconds
   before submitting (after ``--settle``) is the heartbeat load alone.
4. Stops agents and controller and measures the etcd write ceiling on the same etcd
   (``bench.etcd_ceiling``: 128 puts per txn, 8 txns in flight as the store commits, the mean
   size of a placed task record), and reports placements/s as a fraction of it.

Prints progress on stderr, a table on stdout and, as the last stdout line, one JSON object of
figures. Everything it started (processes, the temp dir with etcd's data) is removed at the end,
on an error and on Ctrl-C / SIGTERM. ``--profile py-spy`` samples the controller with py-spy (250 Hz,
only while a thread holds the GIL: the run is CPU-bound, so what counts is where the interpreter's
time goes) and prints it; ``--profile cprofile`` runs it under cProfile. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
from aetcd import rpc

from bench.etcd_ceiling import IN_FLIGHT as CEILING_IN_FLIGHT
from bench.etcd_ceiling import measure as measure_ceiling
from berth.proto.berth.v1 import cluster_pb2, cluster_pb2_grpc
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.quantity import parse_cpu, parse_memory

PREFIX = "/bench/"
IMAGE = "hollow/pause:1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OWN_CODE = ("controller/", "agent/", "proto/", str(Path(__file__).resolve().parents[1]))  # py-spy paths


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS), in kB; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# -- processes -----------------------------------------------------------------------------------


class Processes:
    """Every process the bench starts, stopped in reverse order (each by its own pid)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: list[IO[bytes]] = []

    def spawn(
        self, name: str, argv: list[str], *, stdout_pipe: bool = False, nice: int = 0
    ) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops them in order
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self.started.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> bytes:
        """Signal one process, wait for it (SIGKILL after ``timeout``), return what it printed."""
        out = b""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out or b""

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                self.stop(proc, timeout=10.0)
        for log in self.logs:
            log.close()


def start_etcd(procs: Processes) -> str:
    if shutil.which("etcd") is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = procs.spawn(
        "etcd",
        [
            "etcd",
            "--name=bench",
            f"--data-dir={procs.work / 'etcd-data'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}",
            "--quota-backend-bytes=8589934592",  # 8 GiB: a 100k-task run writes ~1M revisions
        ],
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if b"true" in r.read():
                    return url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"etcd did not start; see {procs.work / 'etcd.log'}")
        time.sleep(0.1)


def start_controller(
    procs: Processes,
    etcd: str,
    address: str,
    profile: str,
    max_heartbeats: float | None = None,
    metrics_port: int | None = None,
) -> subprocess.Popen[bytes]:
    argv = [sys.executable]
    if profile == "cprofile":
        argv += ["-m", "cProfile", "-o", str(procs.work / "controller.cprofile")]
    argv += ["-m", "berth.controller", "--etcd", etcd, "--listen", address, "--prefix", PREFIX]
    argv += ["--metrics-listen", f"127.0.0.1:{metrics_port or free_port()}"]  # metrics on, as in production
    if max_heartbeats is not None:
        argv += ["--max-heartbeats-per-second", str(max_heartbeats)]
    return procs.spawn("controller", argv)


def machine_cores() -> int:
    """The cores this process may run on: what etcd, the controller and the agents share."""
    return len(os.sched_getaffinity(0))


# -- the etcd watch --------------------------------------------------------------------------------


@dataclass(slots=True)
class Observed:
    """What the bench saw committed to etcd, timed on arrival of each watch response."""

    replicas: dict[str, int]
    placed: dict[str, set[bytes]] = field(default_factory=dict)  # service -> task keys with a node
    running: dict[str, set[bytes]] = field(default_factory=dict)  # service -> task ids RUNNING
    placed_at: dict[str, float] = field(default_factory=dict)  # service -> all placed
    running_at: dict[str, float] = field(default_factory=dict)  # service -> all RUNNING
    first_placed: float | None = None
    task_writes: int = 0
    status_writes: int = 0
    node_writes: int = 0
    nodes_down: set[bytes] = field(default_factory=set)
    placed_bytes: int = 0
    revision: int = 0
    placed_total: int = 0
    running_total: int = 0


async def watch(endpoint: str, start_revision: int, seen: Observed, ready: asyncio.Event) -> None:
    target = endpoint.split("://", 1)[-1]
    tasks_p = f"{PREFIX}tasks/".encode()
    status_p = f"{PREFIX}status/".encode()
    nodes_p = f"{PREFIX}nodes/".encode()
    prefix = PREFIX.encode()
    range_end = prefix[:-1] + bytes([prefix[-1] + 1])

    async def requests() -> AsyncIterator[rpc.WatchRequest]:
        yield rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=range_end, start_revision=start_revision
            )
        )
        await asyncio.Event().wait()  # keep the stream open

    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stream = rpc.WatchStub(channel).Watch(requests())
        async for response in stream:
            if response.created:
                ready.set()
            now = time.monotonic()
            seen.revision = max(seen.revision, response.header.revision)
            for event in response.events:
                if event.type != 0:  # PUT only
                    continue
                kv = event.kv
                key = kv.key
                if key.startswith(tasks_p):
                    seen.task_writes += 1
                    value = kv.value
                    if b'"nodeId"' not in value:
                        continue
                    service = key[len(tasks_p) :].rpartition(b"/")[0].decode()
                    placed = seen.placed.setdefault(service, set())
                    if key in placed:
                        continue
                    placed.add(key)
                    seen.placed_total += 1
                    seen.placed_bytes += len(value)
                    if seen.first_placed is None:
                        seen.first_placed = now
                    if len(placed) == seen.replicas.get(service, -1):
                        seen.placed_at[service] = now
                elif key.startswith(status_p):
                    seen.status_writes += 1
                    if b'"TASK_STATE_RUNNING"' not in kv.value:
                        continue
                    task_id = key[len(status_p) :]
                    service = task_id.partition(b".")[0].decode()
                    running = seen.running.setdefault(service, set())
                    if task_id in running:
                        continue
                    running.add(task_id)
                    seen.running_total += 1
                    if len(running) == seen.replicas.get(service, -1):
                        seen.running_at[service] = now
                elif key.startswith(nodes_p):
                    seen.node_writes += 1
                    if b"NODE_STATE_DOWN" in kv.value:
                        seen.nodes_down.add(key)


async def etcd_revision(endpoint: str) -> int:
    target = endpoint.split("://", 1)[-1]
    async with grpc.aio.insecure_channel(target) as channel:
        response = await rpc.KVStub(channel).Range(
            rpc.RangeRequest(key=PREFIX.encode(), limit=1, keys_only=True), timeout=10
        )
        return int(response.header.revision)


# -- the run ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    nodes: int
    tasks: int
    services: int
    register_s: float = 0.0
    submit_s: float = 0.0
    first_placement_s: float | None = None
    placed_s: float | None = None
    acked_s: float | None = None
    placements_per_s: float | None = None
    acks_per_s: float | None = None
    decision_p50_s: float | None = None
    decision_p99_s: float | None = None
    ack_p50_s: float | None = None
    ack_p99_s: float | None = None
    placed: int = 0
    acked: int = 0
    controller_rss_idle_mb: float = 0.0
    controller_peak_rss_mb: float = 0.0
    controller_cpu_s: float = 0.0
    etcd_cpu_s: float = 0.0
    hollow_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0
    cores: int = 0
    cpu_total_s: float = 0.0
    cpu_window_s: float = 0.0
    machine_busy_pct: float | None = None
    idle_controller_cpu_pct: float | None = None
    idle_hollow_cpu_pct: float | None = None
    max_heartbeats_per_second: float | None = None
    task_writes: int = 0
    status_writes: int = 0
    status_writes_per_task: float | None = None
    nodes_down: int = 0
    agent_stream_breaks: int = 0
    agent_heartbeat_timeouts: int = 0
    agent_status_reports: int = 0
    task_record_bytes: int = 0
    etcd_ceiling_keys_per_s: float | None = None
    placements_fraction_of_ceiling: float | None = None
    writes_per_s: float | None = None
    wall_s: float = 0.0
    note: str = ""
    profile: list[tuple[str, float]] = field(default_factory=list)


def service_sizes(tasks: int, services: int) -> list[int]:
    base, extra = divmod(tasks, services)
    return [base + (1 if i < extra else 0) for i in range(services)]


async def wait_nodes_ready(api: cluster_pb2_grpc.ClusterAPIStub, want: int, timeout: float, ctl: Any) -> None:
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        if ctl.poll() is not None:
            raise RuntimeError("the controller exited; see controller.log")
        try:
            nodes = (await api.ListNodes(cluster_pb2.ListNodesRequest(), timeout=30)).nodes
            ready = sum(1 for n in nodes if n.node.state == pb.NODE_STATE_READY)
        except grpc.aio.AioRpcError:
            ready = 0
        if ready != last:
            say(f"nodes ready: {ready}/{want}")
            last = ready
        if ready >= want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {ready}/{want} nodes ready after {timeout:.0f}s")
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace, procs: Processes, result: Result) -> None:
    wall0 = time.monotonic()
    etcd = start_etcd(procs)
    etcd_pid = procs.started[-1][1].pid
    say(f"etcd at {etcd} (data in {procs.work})")
    address = f"127.0.0.1:{free_port()}"
    ctl = start_controller(procs, etcd, address, args.profile, args.max_heartbeats_per_second)
    result.max_heartbeats_per_second = args.max_heartbeats_per_second
    say(f"controller pid {ctl.pid} at {address}")

    per = args.agents_per_process
    n_procs = math.ceil(args.nodes / per)
    rate = max(1.0, args.connect_rate / n_procs)
    fleets: list[subprocess.Popen[bytes]] = []
    for i in range(n_procs):
        count = min(per, args.nodes - i * per)
        argv = [sys.executable, "-m", "berth.agent.hollow", "--controller", address]
        argv += ["--count", str(count), "--start-index", str(i * per + 1), "--cpus", args.cpus]
        argv += ["--memory", args.memory, "--connect-rate", str(rate)]
        fleets.append(procs.spawn(f"hollow-{i}", argv, stdout_pipe=True, nice=args.hollow_nice))
    say(f"{n_procs} hollow-agent processes, {args.nodes} agents, {rate:.0f} connects/s each")

    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    api = cluster_pb2_grpc.ClusterAPIStub(channel)
    t = time.monotonic()
    await wait_nodes_ready(api, args.nodes, args.register_timeout, ctl)
    result.register_s = round(time.monotonic() - t, 2)
    # settle first: agents take up the final heartbeat interval at their next acknowledgement
    await asyncio.sleep(args.settle)
    if args.idle_window > 0:
        # the idle load of a registered cluster: heartbeats and their acknowledgements, nothing else
        idle0, idle_ctl0 = time.monotonic(), cpu_seconds(ctl.pid)
        idle_hollow0 = sum(cpu_seconds(f.pid) for f in fleets)
        await asyncio.sleep(args.idle_window)
        idle_s = time.monotonic() - idle0
        result.idle_controller_cpu_pct = round(100 * (cpu_seconds(ctl.pid) - idle_ctl0) / idle_s, 1)
        result.idle_hollow_cpu_pct = round(
            100 * (sum(cpu_seconds(f.pid) for f in fleets) - idle_hollow0) / idle_s, 1
        )
    result.controller_rss_idle_mb = round(proc_status(ctl.pid, "VmRSS") / 1024, 1)

    spyer: subprocess.Popen[bytes] | None = None
    if args.profile == "py-spy":
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spyer = procs.spawn(
            "py-spy",
            [
                spy,
                "record",
                "--pid",
                str(ctl.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--gil",
                "-o",
                str(procs.work / "controller.folded"),
            ],
        )

    sizes = service_sizes(args.tasks, args.services)
    names = [f"bench-{i:03d}" for i in range(args.services)]
    seen = Observed(replicas=dict(zip(names, sizes, strict=True)))
    watch_ready = asyncio.Event()
    watcher = asyncio.create_task(watch(etcd, await etcd_revision(etcd) + 1, seen, watch_ready))
    await asyncio.wait_for(watch_ready.wait(), 10)
    window0 = time.monotonic()
    cpu0, etcd_cpu0 = cpu_seconds(ctl.pid), cpu_seconds(etcd_pid)
    hollow_cpu0 = [cpu_seconds(f.pid) for f in fleets]
    bench_cpu0 = time.process_time()
    cpu_mb = parse_memory(args.task_memory)
    cpu_m = parse_cpu(args.task_cpu)

    returned: dict[str, float] = {}

    async def create(name: str, replicas: int) -> None:
        spec = pb.ServiceSpec(
            name=name,
            image=IMAGE,
            replicas=replicas,
            resources=pb.Resources(cpu_millis=cpu_m, memory_bytes=cpu_mb),
        )
        await api.CreateService(cluster_pb2.CreateServiceRequest(spec=spec), timeout=args.timeout)
        returned[name] = time.monotonic()

    say(f"submitting {args.services} services, {args.tasks} replicas in all")
    t0 = time.monotonic()

    async def submit_all() -> None:
        await asyncio.gather(*(create(n, s) for n, s in zip(names, sizes, strict=True)))

    submit = asyncio.create_task(submit_all())
    deadline = t0 + args.timeout
    next_progress = t0 + 2
    interrupted = asyncio.Event()  # Ctrl-C / SIGTERM while waiting: report what was reached, then clean up
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    while time.monotonic() < deadline:
        if interrupted.is_set():
            result.note = f"interrupted after {time.monotonic() - t0:.0f}s"
            break
        if watcher.done():
            watcher.result()
            raise RuntimeError("the etcd watch ended")
        if submit.done() and submit.exception() is not None:
            raise RuntimeError(f"CreateService failed: {submit.exception()}")
        if ctl.poll() is not None:
            raise RuntimeError("the controller exited; see controller.log")
        if seen.running_total >= args.tasks and len(seen.running_at) == args.services:
            break
        now = time.monotonic()
        if now >= next_progress:
            next_progress = now + 2
            say(
                f"t={now - t0:5.1f}s services created {len(returned)}/{args.services} "
                f"placed {seen.placed_total}/{args.tasks} running {seen.running_total}/{args.tasks} "
                f"status writes {seen.status_writes} controller cpu {cpu_seconds(ctl.pid) - cpu0:.0f}s "
                f"rss {proc_status(ctl.pid, 'VmRSS') / 1024:.0f}MB nodes down {len(seen.nodes_down)}"
            )
        await asyncio.sleep(0.05)
    else:
        result.note = f"timed out after {args.timeout:.0f}s"
    # the CPU of the run, read as soon as the last task was seen running (within one 50 ms poll)
    spent = {
        "controller": cpu_seconds(ctl.pid) - cpu0,
        "etcd": cpu_seconds(etcd_pid) - etcd_cpu0,
        # a process that died reads 0: count none of it rather than a negative share
        "hollow": sum(max(0.0, cpu_seconds(f.pid) - c0) for f, c0 in zip(fleets, hollow_cpu0, strict=True)),
        "bench": time.process_time() - bench_cpu0,
    }
    result.cpu_window_s = round(time.monotonic() - window0, 3)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(submit, 1)

    placed_all = max(seen.placed_at.values()) if len(seen.placed_at) == args.services else None
    acked_all = max(seen.running_at.values()) if len(seen.running_at) == args.services else None
    result.submit_s = round(max(returned.values()) - t0, 3) if returned else 0.0
    if seen.first_placed is not None:
        result.first_placement_s = round(seen.first_placed - t0, 3)
    if placed_all is not None:
        result.placed_s = round(placed_all - t0, 3)
        result.placements_per_s = round(args.tasks / (placed_all - t0), 1)
    if acked_all is not None:
        result.acked_s = round(acked_all - t0, 3)
        result.acks_per_s = round(args.tasks / (acked_all - t0), 1)
    decisions = [seen.placed_at[n] - returned[n] for n in names if n in seen.placed_at and n in returned]
    acks = [seen.running_at[n] - returned[n] for n in names if n in seen.running_at and n in returned]
    for attr, values in (("decision", decisions), ("ack", acks)):
        for p in (50, 99):
            v = percentile(decisions if attr == "decision" else acks, p) if values else None
            setattr(result, f"{attr}_p{p}_s", None if v is None else round(v, 3))
    result.placed, result.acked = seen.placed_total, seen.running_total
    # to the clock tick (10 ms): the resolution the kernel counts CPU time in
    result.controller_cpu_s = round(spent["controller"], 2)
    result.etcd_cpu_s = round(spent["etcd"], 2)
    result.hollow_cpu_s = round(spent["hollow"], 2)
    result.bench_cpu_s = round(spent["bench"], 2)
    result.cores = machine_cores()
    total = sum(spent.values())
    result.cpu_total_s = round(total, 2)
    # near 100 %: the run is bound by the machine as a whole, and only less CPU per task (in any
    # process: heartbeats included) makes it faster here
    result.machine_busy_pct = round(100 * total / (result.cores * result.cpu_window_s), 1)
    result.controller_peak_rss_mb = round(proc_status(ctl.pid, "VmHWM") / 1024, 1)
    result.task_writes, result.status_writes = seen.task_writes, seen.status_writes
    if seen.running_total:
        result.status_writes_per_task = round(seen.status_writes / seen.running_total, 2)
    end = acked_all or time.monotonic()
    result.writes_per_s = round((seen.task_writes + seen.status_writes) / (end - t0), 1)
    result.nodes_down = len(seen.nodes_down)
    result.task_record_bytes = seen.placed_bytes // max(1, seen.placed_total)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await watcher
    await channel.close()

    if spyer is not None:
        procs.stop(spyer, signal.SIGINT, timeout=30)
        result.profile = fold_profile(procs.work / "controller.folded")
    say("stopping hollow agents and the controller")
    for proc in fleets:
        out = procs.stop(proc, timeout=60).decode(errors="replace").strip().splitlines()
        try:
            stats = json.loads(out[-1]) if out else {}
        except json.JSONDecodeError:
            stats = {}
        result.agent_stream_breaks += int(stats.get("stream_breaks", 0))
        result.agent_heartbeat_timeouts += int(stats.get("heartbeat_timeouts", 0))
        result.agent_status_reports += int(stats.get("status_reports", 0))
    procs.stop(ctl, timeout=30)
    if args.profile == "cprofile":
        result.profile = cprofile_top(procs.work / "controller.cprofile")

    if args.ceiling_keys > 0 and not interrupted.is_set():
        size = result.task_record_bytes or 600
        shape = f"128 puts/txn, {CEILING_IN_FLIGHT} txns in flight"
        say(f"etcd ceiling: {args.ceiling_keys} keys of {size} B, {shape}")
        ceiling = await measure_ceiling(etcd, keys=args.ceiling_keys, value_size=size)
        result.etcd_ceiling_keys_per_s = ceiling.keys_per_s
        if result.placements_per_s:
            result.placements_fraction_of_ceiling = round(result.placements_per_s / ceiling.keys_per_s, 3)
    result.wall_s = round(time.monotonic() - wall0, 1)


def fold_profile(path: Path, top: int = 16) -> list[tuple[str, float]]:
    """Share of samples per Berth function (inclusive: anywhere on the stack) and per leaf frame
    (``self:``, any module), from py-spy's raw (folded) output."""
    if not path.exists():
        return []
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = []
        for raw in stack.split(";"):
            name, _, where = raw.partition(" (")
            file = where.rsplit(":", 1)[0]
            frames.append((f"{name} ({Path(file).name})", file))
        for label in {label for label, file in frames if file.startswith(OWN_CODE) or "/berth/" in file}:
            inclusive[label] += count
        if frames:
            own["self: " + frames[-1][0]] += count
    if not total:
        return []
    ranked = inclusive.most_common(top) + own.most_common(top // 2)
    return [(k, round(100 * v / total, 1)) for k, v in ranked]


def cprofile_top(path: Path, top: int = 20) -> list[tuple[str, float]]:
    import pstats

    if not path.exists():
        return []
    stats = pstats.Stats(str(path))
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
    return [
        (f"{fn} ({Path(file).name}:{line})", round(ct, 2))
        for (file, line, fn), (_, _, _, ct, _) in entries[:top]
    ]


def table(result: Result) -> str:
    def fmt(v: Any, unit: str = "") -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}{unit}" if v < 100 else f"{v:,.1f}{unit}"
        return f"{v:,}{unit}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} %"

    rows = [
        ("nodes / tasks / services", f"{result.nodes:,} / {result.tasks:,} / {result.services}"),
        ("all nodes ready after", fmt(result.register_s, " s")),
        ("CreateService calls done", fmt(result.submit_s, " s")),
        ("first task placed", fmt(result.first_placement_s, " s")),
        ("all placed (in etcd with a node)", fmt(result.placed_s, " s")),
        ("all acked (RUNNING in etcd)", fmt(result.acked_s, " s")),
        ("placements/s", fmt(result.placements_per_s)),
        ("acks/s", fmt(result.acks_per_s)),
        (
            "decision latency p50 / p99",
            f"{fmt(result.decision_p50_s, ' s')} / {fmt(result.decision_p99_s, ' s')}",
        ),
        ("ack latency p50 / p99", f"{fmt(result.ack_p50_s, ' s')} / {fmt(result.ack_p99_s, ' s')}"),
        (
            "controller RSS idle / peak",
            f"{fmt(result.controller_rss_idle_mb, ' MB')} / {fmt(result.controller_peak_rss_mb, ' MB')}",
        ),
        ("controller / etcd CPU", f"{fmt(result.controller_cpu_s, ' s')} / {fmt(result.etcd_cpu_s, ' s')}"),
        ("hollow agents / bench CPU", f"{fmt(result.hollow_cpu_s, ' s')} / {fmt(result.bench_cpu_s, ' s')}"),
        (
            "all CPU / machine busy",
            f"{fmt(result.cpu_total_s, ' s')} in {fmt(result.cpu_window_s, ' s')} / "
            f"{pct(result.machine_busy_pct)} of {result.cores} cores",
        ),
        (
            "idle CPU (heartbeats): controller / hollow",
            f"{pct(result.idle_controller_cpu_pct)} / {pct(result.idle_hollow_cpu_pct)} of a core",
        ),
        (
            "controller --max-heartbeats-per-second",
            "default"
            if result.max_heartbeats_per_second is None
            else f"{result.max_heartbeats_per_second:g}",
        ),
        ("task writes / status writes", f"{result.task_writes:,} / {result.status_writes:,}"),
        ("status writes per task", fmt(result.status_writes_per_task)),
        ("etcd writes/s (tasks+status)", fmt(result.writes_per_s)),
        ("etcd ceiling (128 puts/txn)", fmt(result.etcd_ceiling_keys_per_s, " keys/s")),
        ("placements/s of ceiling", fmt(result.placements_fraction_of_ceiling)),
        ("nodes declared down", fmt(result.nodes_down)),
        (
            "agent stream breaks / hb timeouts",
            f"{result.agent_stream_breaks} / {result.agent_heartbeat_timeouts}",
        ),
        ("wall time", fmt(result.wall_s, " s")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if result.note:
        lines.append(f"{'note'.ljust(width)}  {result.note}")
    if result.profile:
        lines.append("")
        lines.append("controller profile (% of samples, inclusive; 'self:' = leaf frame)")
        lines += [f"  {share:5.1f}  {name}" for name, share in result.profile]
    return "\n".join(lines)


def in_work_dir(
    prefix: str, keep: bool, body: Callable[[Processes], Coroutine[Any, Any, None]]
) -> tuple[bool, str | None]:
    """Run a bench's ``body`` on the event loop with a temp work dir for its processes; stop them
    all and remove the dir (unless ``keep``) however it ends. Returns (failed, why): ``why`` is
    the error, or None when it ended well or on Ctrl-C / SIGTERM."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Processes(work)
    try:
        with interrupted_as_exit():
            asyncio.run(body(procs))
        return False, None
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return True, None
    except Exception as exc:
        if isinstance(exc, grpc.aio.AioRpcError):
            exc = RuntimeError(f"{exc.code().name}: {exc.details()}")
        say(f"failed: {exc}")
        return True, str(exc)
    finally:
        procs.stop_all()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def interrupted_as_exit() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=500, help="hollow agents (5000 for the full run)")
    parser.add_argument("--tasks", type=int, default=10_000, help="replicas in all (100000 for the full run)")
    parser.add_argument("--services", type=int, default=0, help="services (default: one per 1,000 replicas)")
    parser.add_argument("--agents-per-process", type=int, default=1000)
    parser.add_argument("--cpus", default="32", help="capacity of each hollow node")
    parser.add_argument("--memory", default="128Gi", help="capacity of each hollow node")
    parser.add_argument("--task-cpu", default="100m", help="request of each replica")
    parser.add_argument("--task-memory", default="64Mi", help="request of each replica")
    parser.add_argument("--connect-rate", type=float, default=500.0, help="agent registrations/s, all in all")
    parser.add_argument("--register-timeout", type=float, default=300.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="idle seconds after every node is ready, before the idle window",
    )
    parser.add_argument(
        "--idle-window",
        type=float,
        default=10.0,
        help="seconds of idle CPU measured before submitting (0: none)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up waiting for placement/acks")
    parser.add_argument("--ceiling-keys", type=int, default=100_000, help="0 skips the etcd ceiling")
    parser.add_argument("--profile", choices=("none", "py-spy", "cprofile"), default="none")
    parser.add_argument(
        "--hollow-nice",
        type=int,
        default=0,
        help="run the hollow-agent processes at this nice value (they stand in for other machines)",
    )
    parser.add_argument(
        "--max-heartbeats-per-second",
        type=float,
        default=None,
        help="pass to the controller (default: its own default); shows what the heartbeat load costs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, profile)")
    args = parser.parse_args(argv)
    args.services = args.services or max(1, math.ceil(args.tasks / 1000))
    if args.max_heartbeats_per_second is not None and args.max_heartbeats_per_second <= 0:
        parser.error("--max-heartbeats-per-second must be positive")
    if args.settle < 0 or args.idle_window < 0:
        parser.error("--settle and --idle-window must be at least 0")
    if args.tasks // args.services > 10_000:
        parser.error("--services: at most 10,000 replicas per service")

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per agent in the controller

    result = Result(nodes=args.nodes, tasks=args.tasks, services=args.services)
    failed, error = in_work_dir("berth-bench-scheduler-", args.keep, lambda procs: run(args, procs, result))
    if error is not None:
        result.note = error
    print(table(result))
    figures = {k: v for k, v in asdict(result).items() if k != "profile"}
    print(json.dumps(figures))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
