"""Issue 3: host failure, partitions, at-most-one, restarts, busy hosts, etcd restarts, drain.

A 4-host dev cluster with the real controller, agents, runc and etcd. What runs is always read
from runc's own state on every host (``containers``), never only from the controller's view.
Each test restores what it broke (restarts the killed agent, heals the cut link).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from berth.cli.devcluster import DevCluster
from tests.integration.clusterkit import (
    all_running,
    apply,
    berth,
    containers,
    nodes,
    of_service,
    ps,
    stored,
    wait_for,
)
from tests.integration.devtools import BASE_DIR, make_config, owner_alive, traces

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, cgroups, runc)", allow_module_level=True)

WEB = """
name: web
image: IMAGE
replicas: 8
resources: {cpu: 100m, memory: 32Mi}
ports: [8080]
"""

SOLO = """
name: solo
image: IMAGE
replicas: 4
resources: {cpu: 100m, memory: 32Mi}
on_disconnect: stop
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    DevCluster.sweep("dt", BASE_DIR, skip=owner_alive)
    c = DevCluster(make_config("f", hosts=4))
    try:
        c.up()
        wait_for(lambda: len([n for n in nodes(c) if n["state"] == "ready"]) == 4, 30, "4 ready nodes")
        yield c
    finally:
        c.down()
    assert traces(c.name) == []


def node_state(c: DevCluster, name: str) -> str:
    return next(str(n["state"]) for n in nodes(c) if n["name"] == name)


def busiest(found: dict[str, tuple[str, int]]) -> str:
    counts: dict[str, int] = {}
    for host, _ in found.values():
        counts[host] = counts.get(host, 0) + 1
    return max(sorted(counts), key=lambda h: counts[h])


def moved_off(
    c: DevCluster, service: str, count: int, host: str, timeout: float
) -> dict[str, tuple[str, int]]:
    """Wait until exactly ``count`` containers of the service run, none of them on ``host``."""

    def check() -> dict[str, tuple[str, int]] | None:
        found = of_service(containers(c), service)
        return found if len(found) == count and host not in {h for h, _ in found.values()} else None

    return wait_for(check, timeout, f"{count} {service} replicas off {host}")


def steady(c: DevCluster, service: str, count: int) -> dict[str, tuple[str, int]]:
    """Wait until exactly ``count`` containers of the service run, matching `service ps`."""

    def check() -> dict[str, tuple[str, int]] | None:
        rows = all_running(c, service, count)
        real = of_service(containers(c), service)
        if rows and len(real) == count and set(real) == {r["id"] for r in rows}:
            return real
        return None

    return wait_for(check, 90, f"{count} {service} replicas steady")


class Sampler:
    """Counts, every 50 ms in a thread, the service's containers really running (all hosts)."""

    def __init__(self, c: DevCluster, service: str) -> None:
        self.c, self.service = c, service
        self.samples: list[dict[str, tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, subprocess.SubprocessError, json.JSONDecodeError):
                self.samples.append(of_service(containers(self.c), self.service))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_killed_host_work_runs_elsewhere_and_returns_clean(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, WEB)
    before = steady(cluster, "web", 8)
    victim = busiest(before)
    env = {**os.environ, "BERTH_ADDR": cluster.controller_address}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "berth.cli.main", "events", "-o", "json"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # let the stream open before the fault
    t0 = time.monotonic()
    cluster.kill_host(victim)
    after = moved_off(cluster, "web", 8, victim, 30)
    elapsed = time.monotonic() - t0
    assert node_state(cluster, victim) == "down"
    assert all_running(cluster, "web", 8)
    print(f"failover after kill: {elapsed:.1f}s")  # measured properly in bench/failover.py
    watcher.terminate()
    out, _ = watcher.communicate(timeout=10)
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["kind"] for e in events]
    lost = {t for t, (h, _) in before.items() if h == victim}
    assert "node-down" in kinds and next(e for e in events if e["kind"] == "node-down")["node"] == victim
    assert {e["task"] for e in events if e["kind"] == "task-lost"} == lost
    assert {e["task"] for e in events if e["kind"] == "task-replaced"} == lost
    assert len([e for e in events if e["kind"] == "task-started"]) >= len(lost)
    assert all(e["time"] for e in events)
    # the host comes back: it rejoins, holds no stale container, the count stays 8
    cluster.start_agent(victim)
    wait_for(lambda: node_state(cluster, victim) == "ready", 30, f"{victim} ready again")
    final = steady(cluster, "web", 8)
    assert set(final) == set(after)
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def test_cut_then_heal_leaves_exactly_the_count_and_no_stale_container(
    cluster: DevCluster, tmp_path: Path
) -> None:
    apply(cluster, tmp_path, WEB)
    before = steady(cluster, "web", 8)
    victim = busiest(before)
    on_victim = {t for t, (h, _) in before.items() if h == victim}
    cluster.partition(victim)
    try:
        wait_for(lambda: node_state(cluster, victim) == "down", 20, f"{victim} declared down")
        # keep semantics: the cut-off copies still run, replacements run elsewhere
        wait_for(
            lambda: (
                len([t for t, (h, _) in of_service(containers(cluster), "web").items() if h != victim]) == 8
            ),
            30,
            "8 replicas outside the cut host",
        )
        assert on_victim <= set(of_service(containers(cluster), "web"))
    finally:
        cluster.heal(victim)
    wait_for(lambda: node_state(cluster, victim) == "ready", 30, f"{victim} reconnected")
    final = steady(cluster, "web", 8)
    assert not on_victim & set(final), "the healed host still runs replaced copies"
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def cut_solo_host(
    c: DevCluster, tmp_path: Path, while_cut: Callable[[str], None] = lambda _: None
) -> tuple[dict[str, tuple[str, int]], str, list[dict[str, tuple[str, int]]]]:
    """Run SOLO, cut its busiest host (``while_cut`` runs then), wait until its 4 replicas run on
    the other hosts with none left on the cut one, heal, wait until steady. Returns the
    containers before, the cut host and every sample taken meanwhile."""
    apply(c, tmp_path, SOLO)
    before = steady(c, "solo", 4)
    victim = busiest(before)
    with Sampler(c, "solo") as sampler:
        c.partition(victim)
        try:
            while_cut(victim)
            wait_for(
                lambda: len([h for h, _ in of_service(containers(c), "solo").values() if h != victim]) == 4,
                40,
                "4 solo replicas outside the cut host",
            )
            # the cut-off agent stopped its copies by itself (it cannot hear the controller)
            assert not [t for t, (h, _) in of_service(containers(c), "solo").items() if h == victim]
        finally:
            c.heal(victim)
        wait_for(lambda: node_state(c, victim) == "ready", 30, f"{victim} reconnected")
        steady(c, "solo", 4)
    return before, victim, sampler.samples


def assert_never_two_copies(samples: list[dict[str, tuple[str, int]]]) -> None:
    for sample in samples:
        slots = [t.split(".")[1] for t in sample]
        assert len(slots) == len(set(slots)), f"two copies of a slot ran at once: {sorted(sample)}"


def remove_solo(c: DevCluster) -> None:
    berth(c, "service", "rm", "solo")
    wait_for(lambda: not of_service(containers(c), "solo"), 60, "solo removed")


def test_at_most_one_never_runs_two_copies_of_a_slot_across_a_partition(
    cluster: DevCluster, tmp_path: Path
) -> None:
    before, victim, samples = cut_solo_host(cluster, tmp_path)
    assert len(samples) > 50
    assert_never_two_copies(samples)
    assert all(len(sample) <= 4 for sample in samples)
    assert {t.split(".")[1] for t, (h, _) in before.items() if h == victim}
    remove_solo(cluster)


def test_at_most_one_holds_when_the_cut_off_agent_restarts(cluster: DevCluster, tmp_path: Path) -> None:
    """The agent of a cut-off host restarts before its deadline: the new process, which never
    heard the controller, still stops the at-most-one containers it recovers by the deadline of
    the last heartbeat the old process had acknowledged, before their replacements start."""

    def restart_agent(victim: str) -> None:
        cluster.stop_agent(victim)  # its containers keep running
        cluster.start_agent(victim)  # and a new agent finds them, still cut off

    _, _, samples = cut_solo_host(cluster, tmp_path, restart_agent)
    assert len(samples) > 50
    assert_never_two_copies(samples)
    remove_solo(cluster)


def test_at_most_one_update_and_drain_never_run_two_copies_of_a_slot(
    cluster: DevCluster, tmp_path: Path
) -> None:
    """Stop first: on an update and on a drain each old copy has stopped (runc shows it gone)
    before its slot's new copy starts, on whatever host. The containers ignore SIGTERM, so each
    stop takes the whole grace (then SIGKILL): a replacement started early would overlap it for
    seconds, not milliseconds."""
    stubborn = SOLO + "args: [sh, -c, \"trap '' TERM; while :; do sleep 1; done\"]\n"
    apply(cluster, tmp_path, stubborn)
    before = steady(cluster, "solo", 4)
    with Sampler(cluster, "solo") as sampler:
        apply(cluster, tmp_path, stubborn + "env: {RELEASE: '2'}\n")

        def replaced() -> dict[str, tuple[str, int]] | None:
            rows = all_running(cluster, "solo", 4)
            real = of_service(containers(cluster), "solo")
            if rows and set(real) == {r["id"] for r in rows} and not set(real) & set(before):
                return real
            return None

        updated = wait_for(replaced, 120, "4 solo replicas of the new generation")
        victim = busiest(updated)
        berth(cluster, "node", "drain", victim)
        moved_off(cluster, "solo", 4, victim, 120)
    assert len(sampler.samples) > 20
    assert_never_two_copies(sampler.samples)
    berth(cluster, "node", "activate", victim)
    remove_solo(cluster)


def test_controller_and_agent_restarts_reschedule_nothing(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, WEB)
    before = steady(cluster, "web", 8)
    ids_before = {r["id"] for r in ps(cluster, "web")}
    state_before = stored(cluster)
    cluster.stop_controller(signal.SIGKILL)
    cluster.start_controller()
    host = busiest(before)
    cluster.stop_agent(host, signal.SIGTERM)
    cluster.start_agent(host)
    wait_for(lambda: all(n["state"] == "ready" for n in nodes(cluster)), 30, "all nodes ready")
    time.sleep(5)  # longer than the node deadline: a wrongly declared node would show by now
    assert of_service(containers(cluster), "web") == before  # same tasks, same pids: nothing restarted
    assert {r["id"] for r in ps(cluster, "web")} == ids_before
    assert all(r["restarts"] == 0 for r in ps(cluster, "web"))
    assert stored(cluster)[1] == state_before[1]  # no task rewritten
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def test_an_agent_restart_keeps_at_most_one_containers_running(cluster: DevCluster, tmp_path: Path) -> None:
    """With the controller reachable, a restarted agent re-adopts at-most-one containers too:
    its watchdog goes on from the last acknowledged heartbeat and the new registration counts as
    one, so nothing is stopped inside the deadline."""
    apply(cluster, tmp_path, SOLO)
    before = steady(cluster, "solo", 4)
    host = busiest(before)
    cluster.stop_agent(host, signal.SIGTERM)
    cluster.start_agent(host)
    wait_for(lambda: node_state(cluster, host) == "ready", 30, f"{host} ready")
    time.sleep(5)  # past the node deadline: a wrong stop would show by now
    assert of_service(containers(cluster), "solo") == before  # same tasks, same pids
    berth(cluster, "service", "rm", "solo")
    wait_for(lambda: not of_service(containers(cluster), "solo"), 60, "solo removed")


def test_busy_host_is_not_declared_down(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, WEB)
    steady(cluster, "web", 8)
    host = "h1"
    ids_before = {r["id"] for r in ps(cluster, "web")}
    # saturate every core from inside the host's namespace, outside Berth's cgroups
    burners = [
        subprocess.Popen(["nsenter", f"--net={cluster.netns_path(host)}", "sh", "-c", "while :; do :; done"])
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert node_state(cluster, host) == "ready"
            time.sleep(0.5)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert {r["id"] for r in ps(cluster, "web")} == ids_before
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def test_etcd_restart_loses_nothing(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, WEB)
    before = steady(cluster, "web", 8)
    state_before = stored(cluster)
    cluster.stop_etcd()
    try:
        failed = berth(cluster, "service", "scale", "web=9", check=False)
        assert failed.returncode != 0 and "etcd" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    finally:
        cluster.start_etcd()
    wait_for(lambda: stored(cluster) == state_before, 30, "etcd back with the same state")
    assert of_service(containers(cluster), "web") == before
    berth(cluster, "service", "scale", "web=9")
    steady(cluster, "web", 9)
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def test_drain_keeps_the_count_while_moving_work(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, WEB)
    before = steady(cluster, "web", 8)
    victim = busiest(before)
    with Sampler(cluster, "web") as sampler:
        berth(cluster, "node", "drain", victim)
        moved_off(cluster, "web", 8, victim, 60)
    running_counts = [len(s) for s in sampler.samples]
    assert running_counts and min(running_counts) >= 8, f"dropped below 8 during drain: {min(running_counts)}"
    listed = {n["name"]: n for n in nodes(cluster)}
    assert listed[victim]["availability"] == "drain" and listed[victim]["tasks"] == 0
    steady(cluster, "web", 8)
    berth(cluster, "node", "activate", victim)
    assert next(n for n in nodes(cluster) if n["name"] == victim)["availability"] == "active"
    berth(cluster, "service", "rm", "web")
    wait_for(lambda: not of_service(containers(cluster), "web"), 60, "web removed")


def test_node_rm_refuses_a_ready_node(cluster: DevCluster) -> None:
    proc = berth(cluster, "node", "rm", "h1", check=False)
    assert proc.returncode != 0 and "only a down node can be removed" in proc.stderr
