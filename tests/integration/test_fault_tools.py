"""``berth dev kill|cut|heal|start`` against a real dev cluster (etcd, registry, controller, 3 agents, runc).

What each fault does is checked from the machine itself, never from the controller: /proc (pids, network
namespaces), cgroupfs (every hierarchy), ``runc list`` in each host's state dir, TCP connects between the
root namespace and the hosts. Nothing here asserts what the controller does about a fault (rescheduling is
tested elsewhere); the service only gives the hosts real containers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from berth.cli.devcluster import DevCluster
from tests.integration.clusterkit import berth, containers, of_service, wait_for
from tests.integration.devtools import BASE_DIR, make_config, owner_alive, traces

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, cgroups, runc)", allow_module_level=True)

T = TypeVar("T")
SERVICE = "web"


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    DevCluster.sweep("dt", BASE_DIR, skip=owner_alive)
    c = DevCluster(make_config("t", hosts=3))
    try:
        c.up()
        assert c.image
        berth(c, "service", "create", SERVICE, "--image", c.image, "--replicas", "3", "--port", "8080",
              "--cpu", "100m", "--memory", "32Mi")  # fmt: skip
        # the scheduler spreads a service's replicas: one container per host
        wait_for(lambda: sorted(h for h, _ in running(c).values()) == ["h1", "h2", "h3"], 60,
                 "one running container on each of h1, h2, h3")  # fmt: skip
        yield c
    finally:
        c.down()
    assert traces(c.name) == []


# -- helpers -----------------------------------------------------------------------------------


def dev(
    c: DevCluster, command: str, host: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return berth(c, "dev", command, host, "--name", c.name, "--base-dir", str(BASE_DIR), *extra, check=check)


def runc_list(c: DevCluster, host: str) -> list[dict[str, Any]]:
    root = Path(c.hosts[host].state_dir) / "runc"
    if not root.exists():
        return []
    out = subprocess.run(
        ["runc", "--root", str(root), "list", "-f", "json"], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out or "null") or [])


def running(c: DevCluster) -> dict[str, tuple[str, int]]:
    """Containers of the service that runc reports running: task id -> (host, pid)."""
    return of_service(containers(c), SERVICE)


def settle(c: DevCluster) -> dict[str, tuple[str, int]]:
    """Wait until the service is steady: 3 containers, one per slot, every agent up and connected. A
    fault of an earlier test may have had its replicas replaced, and the healed/restarted agent then
    stops the old copies: a snapshot taken before that would see them go."""
    view = fresh(c)

    def steady() -> dict[str, tuple[str, int]] | None:
        found = running(c)
        slots = sorted(tid.split(".")[1] for tid in found)
        if slots != ["1", "2", "3"] or not all(view.agent_alive(h) for h in c.hosts):
            return None
        nodes = json.loads(berth(c, "node", "ls", "-o", "json").stdout)
        return found if all(n["state"] == "ready" for n in nodes) else None

    wait_for(steady, 60, "3 running containers, one per slot, every node ready")
    time.sleep(1)  # and still so a moment later
    return wait_for(steady, 30, "a steady service")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in "ZX"


def netns_pids(c: DevCluster, host: str) -> list[int]:
    st = os.stat(c.netns_path(host))
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino) and alive(int(entry)):
            found.append(int(entry))
    return found


def cgroup_pids(c: DevCluster, host: str) -> dict[str, list[int]]:
    """Live pids anywhere below the host's cgroup parent, per directory, in every mounted hierarchy."""
    parent = c.hosts[host].cgroup_parent
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    roots = {m[1] for m in mounts if m[2] in ("cgroup", "cgroup2")}
    found: dict[str, list[int]] = {}
    for root in roots:
        for dirpath, _, files in os.walk(Path(root) / parent):
            if "cgroup.procs" in files:
                pids = [int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split() if alive(int(p))]
                if pids:
                    found[dirpath] = pids
    return found


def tcp_reachable(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_reachable_from(c: DevCluster, host: str, address: str, port: int) -> bool:
    """A TCP connect from inside ``host``'s network namespace."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), timeout=1.0).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    proc = subprocess.run(
        ["nsenter", f"--net={c.netns_path(host)}", "--", sys.executable, "-c", script],
        capture_output=True,
        timeout=20,
    )
    return proc.returncode == 0


def published(c: DevCluster, host: str) -> tuple[str, int]:
    """host:port where one of the service's replicas on ``host`` answers."""
    rows = json.loads(berth(c, "service", "ps", SERVICE, "-o", "json").stdout)
    for r in rows:
        if r["node"] == host and r["state"] == "running" and r["address"]:
            addr, _, port = str(r["address"]).rpartition(":")
            return addr, int(port)
    raise AssertionError(f"no running replica with an address on {host}: {rows}")


def fresh(c: DevCluster) -> DevCluster:
    """A new view of the cluster from its state file: ``berth dev start`` (another process) records the
    new agent's pid there, not in the fixture's object."""
    return DevCluster(c.config)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- tests -------------------------------------------------------------------------------------


def test_errors_are_one_line(cluster: DevCluster) -> None:
    for command in ("kill", "cut", "heal", "start"):
        line = one_error_line(dev(cluster, command, "h9", check=False))
        assert "no host 'h9'" in line and "h1, h2, h3" in line
        line = one_error_line(
            berth(cluster, "dev", command, "h1", "--name", "nosuch", "--base-dir", str(BASE_DIR), check=False)
        )
        assert "'nosuch' is not up" in line
    line = one_error_line(dev(cluster, "start", "h1", check=False))  # its agent runs
    assert "already running" in line


def test_cut_silences_the_host_and_heal_restores_it(cluster: DevCluster) -> None:
    host = "h2"
    h = cluster.hosts[host]
    settle(cluster)
    address, port = published(cluster, host)
    assert address == h.address
    controller_port = cluster.config.controller_port
    before = {tid: pid for tid, (hh, pid) in running(cluster).items() if hh == host}
    assert before
    assert tcp_reachable(address, port)
    assert tcp_reachable_from(cluster, host, cluster.bridge_ip, controller_port)

    out = dev(cluster, "cut", host).stdout
    assert "cut off" in out
    try:
        assert cluster.partitioned(host)
        # no packets either way: root namespace -> host (the published port, the container subnet) and
        # host -> bridge (controller) and -> another host
        assert not tcp_reachable(address, port)
        container_ip = json.loads(berth(cluster, "service", "ps", SERVICE, "-o", "json").stdout)
        ips = [r["container_ip"] for r in container_ip if r["node"] == host and r["container_ip"]]
        assert ips and not tcp_reachable(ips[0], 8080)
        assert not tcp_reachable_from(cluster, host, cluster.bridge_ip, controller_port)
        other_address, other_port = published(cluster, "h3")
        assert not tcp_reachable_from(cluster, host, other_address, other_port)
        # ... while the host lives on: its agent, its containers (same pids, past the 4 s node deadline),
        # which still answer inside the host
        time.sleep(5)
        assert cluster.agent_alive(host)
        now = {tid: pid for tid, (hh, pid) in running(cluster).items() if hh == host}
        assert now == before
        assert all(alive(pid) for pid in before.values())
        assert tcp_reachable_from(cluster, host, address, port)
        assert "already cut off" in dev(cluster, "cut", host).stdout
    finally:
        out = dev(cluster, "heal", host).stdout
    assert "reachable" in out
    assert not cluster.partitioned(host)
    # the link carries traffic both ways again (a TCP handshake from the host to the bridge). The
    # container behind the old published port may be gone by now, and rightly: it was replaced
    # while the host was cut off, and the reconnected agent stops replaced copies.
    wait_for(
        lambda: tcp_reachable_from(cluster, host, cluster.bridge_ip, controller_port),
        10,
        "controller from h2",
    )
    assert "was not cut off" in dev(cluster, "heal", host).stdout


def test_kill_leaves_nothing_of_the_host_running(cluster: DevCluster) -> None:
    host = "h1"
    agent_pid = next(p["pid"] for p in cluster.status()["processes"] if p["name"] == f"agent-{host}")
    now = settle(cluster)
    mine = {tid: pid for tid, (hh, pid) in now.items() if hh == host}
    others = {tid: pid for tid, (hh, pid) in now.items() if hh != host}
    assert mine and others
    container_pids = {pid for c in cgroup_pids(cluster, host).values() for pid in c}
    assert set(mine.values()) <= container_pids
    assert agent_pid in netns_pids(cluster, host)

    out = dev(cluster, "kill", host).stdout
    assert "powered off" in out

    assert not alive(agent_pid)
    assert not cluster.agent_alive(host)
    assert not [pid for pid in container_pids if alive(pid)]
    assert cgroup_pids(cluster, host) == {}
    assert netns_pids(cluster, host) == []
    states = {e["id"]: e["status"] for e in runc_list(cluster, host)}
    assert set(mine) <= set(states)  # state stays on disk, as after a power loss ...
    assert all(s == "stopped" for s in states.values()), states  # ... but nothing runs
    # the other hosts are untouched
    assert all(alive(pid) for pid in others.values())
    assert all(cluster.agent_alive(hh) for hh in cluster.hosts if hh != host)

    # killing a dead host again is harmless
    assert "agent was not running" in dev(cluster, "kill", host).stdout
    assert "agent is not running" in dev(cluster, "heal", host).stdout

    assert "agent started" in dev(cluster, "start", host).stdout
    assert fresh(cluster).agent_alive(host)
    assert netns_pids(cluster, host)


def test_silent_kill_also_cuts_the_link(cluster: DevCluster) -> None:
    host = "h3"
    out = dev(cluster, "kill", host, "--silent").stdout
    assert "link is down" in out
    try:
        assert cluster.partitioned(host)
        assert not cluster.agent_alive(host)
        assert netns_pids(cluster, host) == [] and cgroup_pids(cluster, host) == {}
        assert all(e["status"] == "stopped" for e in runc_list(cluster, host))
        assert "its link is down" in dev(cluster, "start", host).stdout
        assert fresh(cluster).agent_alive(host)
    finally:
        dev(cluster, "heal", host)
    assert not cluster.partitioned(host)
