"""How long until a service is whole again after a host is lost, measured from the containers themselves.

``python -m bench.failover [--rounds 5] [--mode kill|cut|both] [--hosts 4] [--replicas 12]`` (as root)
builds its own dev cluster (unique name, free ports and subnets), runs a service of ``--replicas``
replicas and, round after round, takes down the host that runs most of them:

- ``kill``: power loss (``DevCluster.kill_host``: the agent, its helpers and every container SIGKILLed);
  restored with ``start_agent``.
- ``cut``: partition (``DevCluster.partition``: the host's link goes down, nothing gets in or out, its
  containers keep running); restored with ``heal``.
- ``at_most_one_cut``: ``cut`` on a service with ``on_disconnect: stop`` (its replicas must never run
  twice: the cut-off agent stops them before the controller starts replacements).
- ``baseline``: ``scale`` from N to N+1 until the new replica runs: placement + start, no failure
  detection; read the failover figures against it.

What runs is read every 50 ms with ``runc --root <host state dir>/runc list`` for every host (runc only
reads files and checks pids, so this works for a cut-off host from the root namespace too). Progress
goes to stderr, one table per scenario to stdout, and the last stdout line is one JSON object of figures.
The cluster is removed at the end, on error and on Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from berth.cli.client import Client
from berth.cli.devcluster import (
    DevCluster,
    DevClusterConfig,
    DevClusterError,
    free_port_pairs,
    free_subnet_index,
)
from berth.cli.devcluster import owner_alive as cluster_owner_alive
from berth.cli.errors import CliError
from berth.proto.berth.v1 import cluster_pb2, types_pb2

BASE_DIR = Path("/var/tmp/berth-bench")
NAME_PREFIX = "bf"
POLL_S = 0.05
SERVICE = "web"
AT_MOST_ONE = "solo"
CPU = "100m"
MEMORY = "32Mi"


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# -- cluster setup -----------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    return free_port_pairs(n, 40000, 50000)


def free_subnet() -> int:
    index = free_subnet_index()
    if index is None:
        raise SystemExit("no free dev-cluster subnet (10.211-219 are all routed here)")
    return index


def owner_alive(name: str) -> bool:
    return cluster_owner_alive(name, NAME_PREFIX)


def make_cluster(hosts: int) -> DevCluster:
    etcd, registry, controller = free_ports(3)
    return DevCluster(
        DevClusterConfig(
            name=f"{NAME_PREFIX}{os.getpid()}",
            hosts=hosts,
            base_dir=BASE_DIR,
            etcd_port=etcd,
            registry_port=registry,
            controller_port=controller,
            subnet_index=free_subnet(),
        )
    )


def berth_cli(cluster: DevCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BERTH_ADDR": cluster.controller_address}
    return subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


# -- what runs: runc's view of every host ---------------------------------------------------------


def slot_of(task_id: str) -> int | None:
    """``<service>.<slot>.<hex>`` -> slot."""
    parts = task_id.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass
class Census:
    """Running containers of one service per host (task ids), from ``runc list``."""

    by_host: dict[str, list[str]]

    def total(self, hosts: Sequence[str] | None = None) -> int:
        return sum(len(v) for h, v in self.by_host.items() if hosts is None or h in hosts)

    def slots(self, hosts: Sequence[str] | None = None) -> dict[int, int]:
        """slot -> how many containers of it run (on ``hosts``, default all)."""
        out: dict[int, int] = {}
        for h, ids in self.by_host.items():
            if hosts is not None and h not in hosts:
                continue
            for tid in ids:
                slot = slot_of(tid)
                if slot is not None:
                    out[slot] = out.get(slot, 0) + 1
        return out


class Watcher:
    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.hosts = {name: Path(h.state_dir) / "runc" for name, h in cluster.hosts.items()}
        self._last: dict[str, list[dict[str, Any]]] = {h: [] for h in self.hosts}

    def census(self, service: str) -> Census:
        """One ``runc list`` per host, run in parallel; a host whose listing fails (a container being
        deleted under runc's feet) keeps its previous listing for this sample."""
        procs = {
            h: subprocess.Popen(
                ["runc", "--root", str(root), "list", "-f", "json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for h, root in self.hosts.items()
            if root.is_dir()
        }
        for h, p in procs.items():
            out, _ = p.communicate(timeout=20)
            if p.returncode == 0:
                with contextlib.suppress(json.JSONDecodeError):
                    self._last[h] = list(json.loads(out or "null") or [])
        return Census(
            {
                h: sorted(
                    str(e["id"])
                    for e in entries
                    if e.get("status") == "running" and str(e.get("id", "")).startswith(f"{service}.")
                )
                for h, entries in self._last.items()
            }
        )


def ticks(period: float = POLL_S) -> Iterator[float]:
    """Yields the time since start every ``period`` seconds (never drifting, never bunching up)."""
    start = time.monotonic()
    n = 0
    while True:
        now = time.monotonic()
        yield now - start
        n = max(n + 1, math.ceil((time.monotonic() - start) / period))
        time.sleep(max(0.0, start + n * period - time.monotonic()))


# -- the controller's view (only to know when the cluster is steady again) ------------------------


def node_state(client: Client, name: str) -> int | None:
    try:
        nodes = client.call(client.stub.ListNodes, cluster_pb2.ListNodesRequest()).nodes
    except CliError:
        return None
    return next((int(v.node.state) for v in nodes if v.node.name == name), None)


def nodes_ready(client: Client, names: Sequence[str]) -> bool:
    try:
        nodes = client.call(client.stub.ListNodes, cluster_pb2.ListNodesRequest()).nodes
    except CliError:
        return False
    ready = {v.node.name for v in nodes if v.node.state == types_pb2.NODE_STATE_READY}
    return set(names) <= ready


# -- rounds -----------------------------------------------------------------------------------------


@dataclass
class Round:
    scenario: str
    host: str
    moved: int  # replicas that ran on the faulted host
    failover_s: float | None  # None: not whole again within --timeout
    max_running: int  # most replicas running at once anywhere, fault to steady again
    double_slot: bool  # some slot had two running containers at once
    restore_s: float | None  # heal/start until steady again; None: never steady
    note: str = ""
    down_s: float | None = None  # until the controller showed the node down (polled every 0.25 s)


@dataclass
class Scenario:
    name: str
    rounds: list[Round] = field(default_factory=list)
    skipped: str = ""


class Bench:
    def __init__(self, cluster: DevCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.replicas: int = args.replicas
        self.timeout: float = args.timeout
        self.steady_timeout: float = args.steady_timeout
        self.watch = Watcher(cluster)
        self.client = Client(cluster.controller_address, timeout=10)
        self.hosts = sorted(cluster.hosts)

    def wait_steady(
        self,
        service: str,
        replicas: int,
        timeout: float,
        on_sample: Callable[[Census], None] | None = None,
        *,
        start: float | None = None,
    ) -> float | None:
        """Seconds (since ``start``, default now) until exactly ``replicas`` containers run, one per slot,
        every agent is up, every link is up and every node is ready; None after ``timeout``."""
        start = time.monotonic() if start is None else start
        last_api = -1.0
        api_ok = False
        for t in ticks():
            c = self.watch.census(service)
            if on_sample is not None:
                on_sample(c)
            slots = c.slots()
            whole = c.total() == replicas and sorted(slots) == list(range(1, replicas + 1))
            if whole and t - last_api >= 0.25:
                last_api = t
                api_ok = all(
                    self.cluster.agent_alive(h) and not self.cluster.partitioned(h) for h in self.hosts
                ) and nodes_ready(self.client, self.hosts)
            if whole and api_ok:
                return time.monotonic() - start
            if t > timeout:
                return None
        raise AssertionError("unreachable")

    # -- baseline: scale N -> N+1

    def baseline_round(self, i: int) -> Round:
        target = self.replicas + 1
        t0 = time.monotonic()
        self.client.call(
            self.client.stub.ScaleService, cluster_pb2.ScaleServiceRequest(name=SERVICE, replicas=target)
        )
        elapsed: float | None = None
        max_running = 0
        for _ in ticks():
            c = self.watch.census(SERVICE)
            max_running = max(max_running, c.total())
            if target in c.slots():
                elapsed = time.monotonic() - t0
                break
            if time.monotonic() - t0 > self.timeout:
                break
        self.client.call(
            self.client.stub.ScaleService,
            cluster_pb2.ScaleServiceRequest(name=SERVICE, replicas=self.replicas),
        )
        restore = self.wait_steady(SERVICE, self.replicas, self.steady_timeout)
        return Round("baseline", "-", 0, elapsed, max_running, False, restore)

    # -- one fault

    def fault_round(self, scenario: str, service: str, mode: str) -> Round:
        before = self.watch.census(service)
        host = max(self.hosts, key=lambda h: (len(before.by_host.get(h, [])), -self.hosts.index(h)))
        moved = len(before.by_host.get(host, []))
        others = [h for h in self.hosts if h != host]
        max_running = before.total()
        double = False

        def observe(c: Census) -> None:
            nonlocal max_running, double
            max_running = max(max_running, c.total())
            double = double or any(n > 1 for n in c.slots().values())

        t0 = time.monotonic()
        if mode == "kill":
            self.cluster.kill_host(host)
        else:
            self.cluster.partition(host)
        failover: float | None = None
        down: float | None = None
        last_api = -1.0
        for t in ticks():
            c = self.watch.census(service)
            observe(c)
            if len(c.slots(others)) >= self.replicas:
                failover = time.monotonic() - t0
                if down is None and node_state(self.client, host) == types_pb2.NODE_STATE_DOWN:
                    down = time.monotonic() - t0  # an upper bound: it went down since the last look
                break
            if down is None and t - last_api >= 0.25:
                last_api = t
                if node_state(self.client, host) == types_pb2.NODE_STATE_DOWN:
                    down = time.monotonic() - t0
            if time.monotonic() - t0 > self.timeout:
                break
        note = "" if failover is not None else f"not whole within {self.timeout:.0f}s"
        t1 = time.monotonic()
        if mode == "kill":
            self.cluster.start_agent(host)
        else:
            self.cluster.heal(host)
        restore = self.wait_steady(service, self.replicas, self.steady_timeout, observe, start=t1)
        if restore is None:
            note = (note + "; " if note else "") + f"not steady {self.steady_timeout:.0f}s after restore"
        return Round(scenario, host, moved, failover, max_running, double, restore, note, down)

    def fault_rounds(self, scenario: str, service: str, mode: str) -> Callable[[int], Round]:
        return lambda _: self.fault_round(scenario, service, mode)

    def run_scenario(self, scenario: Scenario, rounds: int, make_round: Callable[[int], Round]) -> None:
        for i in range(1, rounds + 1):
            r = make_round(i)
            scenario.rounds.append(r)
            fo = "-" if r.failover_s is None else f"{r.failover_s:.2f}s"
            rs = "-" if r.restore_s is None else f"{r.restore_s:.2f}s"
            say(
                f"{scenario.name} round {i}/{rounds}: host {r.host} ({r.moved} replicas) whole after {fo}, "
                f"max running {r.max_running}{', DOUBLE SLOT' if r.double_slot else ''}, steady again after "
                f"{rs}{' (' + r.note + ')' if r.note else ''}"
            )
            if r.restore_s is None:
                scenario.skipped = f"stopped after round {i}: the cluster did not become steady again"
                return
            if r.failover_s is None and r.moved and all(x.failover_s is None for x in scenario.rounds):
                if i < rounds:
                    scenario.skipped = (
                        f"stopped after round {i}: nothing was replaced within {self.timeout:.0f}s "
                        "(no failure detection in this controller?)"
                    )
                return

    def create_services(self) -> None:
        image = self.cluster.image or ""
        p = berth_cli(
            self.cluster, "service", "create", SERVICE, "--image", image, "--replicas", str(self.replicas),
            "--port", "8080", "--cpu", CPU, "--memory", MEMORY,
        )  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(f"service create failed: {p.stderr.strip()}")
        say(f"service {SERVICE}: {self.replicas} replicas requested; waiting for them to run")
        if self.wait_steady(SERVICE, self.replicas, 120) is None:
            raise SystemExit(f"{SERVICE}: {self.replicas} replicas did not all run within 120s")

    def switch_to_at_most_one(self) -> str:
        """Remove ``web`` and run ``solo`` (on_disconnect: stop) instead; returns why not, or ''."""
        self.client.call(self.client.stub.RemoveService, cluster_pb2.RemoveServiceRequest(name=SERVICE))
        for t in ticks(0.2):
            if self.watch.census(SERVICE).total() == 0:
                break
            if t > 60:
                return f"{SERVICE} still had containers 60s after rm"
        spec = (
            f"name: {AT_MOST_ONE}\nimage: {self.cluster.image}\nreplicas: {self.replicas}\n"
            f"resources: {{cpu: {CPU}, memory: {MEMORY}}}\nports: [8080]\non_disconnect: stop\n"
        )
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(spec)
        try:
            p = berth_cli(self.cluster, "service", "apply", "-f", f.name)
        finally:
            os.unlink(f.name)
        if p.returncode != 0:
            return f"`berth service apply` refused on_disconnect: stop: {p.stderr.strip()}"
        say(f"service {AT_MOST_ONE} (on_disconnect: stop): waiting for {self.replicas} replicas")
        if self.wait_steady(AT_MOST_ONE, self.replicas, 120) is None:
            return f"{AT_MOST_ONE}: {self.replicas} replicas did not all run within 120s"
        return ""


# -- figures ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """Nearest-rank percentile; a round that never finished counts as infinitely slow (-> None)."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    v = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    return None if v is None else round(v, 3)


def figures(s: Scenario, replicas: int, *, slots: bool = False) -> dict[str, Any]:
    times = [r.failover_s for r in s.rounds]
    out: dict[str, Any] = {
        "p50_s": percentile(times, 0.50),
        "p99_s": percentile(times, 0.99),
        "rounds": len(s.rounds),
        "timeouts": sum(1 for t in times if t is None),
    }
    if s.name != "baseline":
        out["max_running"] = max((r.max_running for r in s.rounds), default=None)
        out["over_count_rounds"] = sum(1 for r in s.rounds if r.max_running > replicas)
        out["node_down_p50_s"] = percentile([r.down_s for r in s.rounds], 0.5)
        out["restore_p50_s"] = percentile([r.restore_s for r in s.rounds], 0.5)
    if slots:
        out["double_slot_rounds"] = sum(1 for r in s.rounds if r.double_slot)
    if s.skipped:
        out["note"] = s.skipped
    return out


def print_table(s: Scenario, replicas: int) -> None:
    print(f"\n== {s.name} ({replicas} replicas)")
    if not s.rounds:
        print(f"   skipped: {s.skipped}")
        return
    head = (
        "round", "host", "on host", "node down after", "whole after", "max running", "double slot",
        "steady after", "note",
    )  # fmt: skip
    rows = [
        (
            str(i),
            r.host,
            str(r.moved),
            "-" if r.down_s is None else f"{r.down_s:.2f}s",
            "-" if r.failover_s is None else f"{r.failover_s:.2f}s",
            str(r.max_running),
            "yes" if r.double_slot else "no",
            "-" if r.restore_s is None else f"{r.restore_s:.2f}s",
            r.note,
        )
        for i, r in enumerate(s.rounds, 1)
    ]
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(head)]
    for row in (head, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if s.skipped:
        print(f"   {s.skipped}")


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    ap.add_argument(
        "--mode", choices=("kill", "cut", "both"), default="both", help="which faults (default both)"
    )
    ap.add_argument("--hosts", type=int, default=4, help="hosts in the cluster (default 4)")
    ap.add_argument("--replicas", type=int, default=12, help="replicas of the service (default 12)")
    ap.add_argument(
        "--timeout", type=float, default=20.0, help="seconds a round may take to be whole again (default 20)"
    )
    ap.add_argument(
        "--steady-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the cluster to be steady after a restore (default 60)",
    )
    args = ap.parse_args(argv)
    if args.hosts < 2 or args.rounds < 1 or args.replicas < 1:
        ap.error("need --hosts >= 2, --rounds >= 1, --replicas >= 1")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: the failover bench needs root (it builds a dev cluster)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    swept = DevCluster.sweep(NAME_PREFIX, BASE_DIR, skip=owner_alive)
    if swept:
        say(f"removed leftovers of earlier bench runs: {', '.join(swept)}")
    started = time.monotonic()
    cluster = make_cluster(args.hosts)
    scenarios: dict[str, Scenario] = {}
    try:
        say(f"dev cluster {cluster.name}: {args.hosts} hosts, controller {cluster.controller_address}")
        cluster.up(progress=lambda line: say(f"  {line}"))
        bench = Bench(cluster, args)
        bench.create_services()

        base = scenarios["baseline"] = Scenario("baseline")
        bench.run_scenario(base, args.rounds, bench.baseline_round)
        modes = ["kill", "cut"] if args.mode == "both" else [args.mode]
        for mode in modes:
            s = scenarios[mode] = Scenario(mode)
            bench.run_scenario(s, args.rounds, bench.fault_rounds(mode, SERVICE, mode))
        if "cut" in modes:
            s = scenarios["at_most_one_cut"] = Scenario("at_most_one_cut")
            why = bench.switch_to_at_most_one()
            if why:
                s.skipped = why
                say(f"at_most_one_cut skipped: {why}")
            else:
                bench.run_scenario(s, args.rounds, bench.fault_rounds(s.name, AT_MOST_ONE, "cut"))
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (DevClusterError, CliError) as e:
        say(f"error: {e}")
        return 1
    finally:
        say(f"removing dev cluster {cluster.name}")
        try:
            cluster.down()
        except DevClusterError as e:
            say(f"error: {e}")
        if scenarios:
            for s in scenarios.values():
                print_table(s, args.replicas)
            result = {
                name: figures(s, args.replicas, slots=name == "at_most_one_cut")
                for name, s in scenarios.items()
            }
            print(f"\n(total {time.monotonic() - started:.0f}s)", file=sys.stderr)
            print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
