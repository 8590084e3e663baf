"""Issue 2 end to end: real etcd, registry, controller, agents in network namespaces, runc.

One 3-host dev cluster (plus a 4th host labelled zone=iso, added while up) serves the whole
module; each test declares its own services and removes them. What runs is checked from the
machine itself (runc's state, /proc, cgroup files, mounts, HTTP), not only from the controller.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from berth.cli.devcluster import DevCluster
from tests.integration.clusterkit import (
    all_running,
    apply,
    berth,
    containers,
    get,
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

T = TypeVar("T")
MiB = 2**20


# -- the cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    DevCluster.sweep("dt", BASE_DIR, skip=owner_alive)
    c = DevCluster(make_config("s", hosts=3))
    try:
        c.up()
        c.add_host("h4", labels={"zone": "iso"})
        wait_for(lambda: len([n for n in nodes(c) if n["state"] == "ready"]) == 4, 30, "4 ready nodes")
        yield c
    finally:
        c.down()
    assert traces(c.name) == []


# -- helpers -----------------------------------------------------------------------------------


def cgroup_file(pid: int, controller: str, v1_name: str, v2_name: str) -> str:
    """Read a cgroup limit of a process, from whichever hierarchy holds it (v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return (Path(f"/sys/fs/cgroup/{controller}") / path.lstrip("/") / v1_name).read_text().strip()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return (Path("/sys/fs/cgroup/unified") / line[3:].lstrip("/") / v2_name).read_text().strip()
    raise AssertionError(f"no {controller} cgroup for pid {pid}")


def in_container(pid: int, script: str) -> str:
    """Run a shell inside a container's pid and mount namespaces (its own /proc and files)."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-p", "-m", "--", "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout


def leftovers(c: DevCluster, task_id: str) -> list[str]:
    """Anything a removed container could leave: runc state, bundle, mounts, cgroup dirs, netns."""
    left = []
    for host in c.hosts.values():
        for path in (Path(host.state_dir) / "containers" / task_id, Path(host.state_dir) / "runc" / task_id):
            if path.exists():
                left.append(str(path))
    left += [m for m in Path("/proc/self/mounts").read_text().splitlines() if task_id in m]
    for root in Path("/sys/fs/cgroup").iterdir():
        for parent in root.glob(f"berth-{c.name}-*"):
            left += [str(p) for p in parent.rglob(task_id)]
    return left


PORTAL = """
name: portal
image: IMAGE
replicas: 6
resources: {cpu: 250m, memory: 64Mi}
ports: [8080]
"""


# -- tests -------------------------------------------------------------------------------------


def test_portal_replicas_answer_at_their_addresses_spread_and_limited(
    cluster: DevCluster, tmp_path: Path
) -> None:
    apply(cluster, tmp_path, PORTAL)
    rows = wait_for(lambda: all_running(cluster, "portal", 6), 90, "6 portal replicas running")
    assert len({r["node"] for r in rows}) >= 2, rows
    real = of_service(containers(cluster), "portal")
    assert set(real) == {r["id"] for r in rows}
    for row in rows:
        assert row["address"], row
        assert f"task={row['id']} " in get(f"http://{row['address']}/whoami")
        host, pid = real[row["id"]]
        assert host == row["node"] and pid == row["pid"]
        assert int(cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")) == 64 * MiB
        assert cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] == "25000"
    by_node: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_node.setdefault(row["node"], []).append(row)
    a, b = next(group for group in by_node.values() if len(group) >= 2)[:2]
    assert a["container_ip"] != b["container_ip"]
    assert os.readlink(f"/proc/{a['pid']}/ns/net") != os.readlink(f"/proc/{b['pid']}/ns/net")
    for row in (a, b):  # the same container port, each in its own namespace
        assert f"task={row['id']} " in get(f"http://{row['container_ip']}:8080/whoami")
    # applying the same file again changes nothing
    before = stored(cluster)
    path = tmp_path / "spec.yaml"
    assert "unchanged" in berth(cluster, "service", "apply", "-f", str(path)).stdout
    assert stored(cluster) == before
    berth(cluster, "service", "rm", "portal")


def test_containers_are_isolated_and_oom_kill_restarts_only_the_offender(
    cluster: DevCluster, tmp_path: Path
) -> None:
    apply(
        cluster,
        tmp_path,
        """
name: iso
image: IMAGE
replicas: 2
resources: {memory: 64Mi}
ports: [8080]
constraints: ["zone==iso"]
""",
    )
    rows = wait_for(lambda: all_running(cluster, "iso", 2), 60, "2 iso replicas")
    assert {r["node"] for r in rows} == {"h4"}
    a, b = rows
    seen_by_a = in_container(a["pid"], "echo secret > /tmp/only-a; ps -o pid,args")
    assert "only-a" not in in_container(b["pid"], "ls /tmp")
    assert "secret" not in in_container(b["pid"], "cat /tmp/only-a 2>&1 || true")
    # a's view of processes: only its own (pid 1 is its start.sh), never b's httpd or host pids
    pids_in_a = [line.split()[0] for line in seen_by_a.splitlines()[1:]]
    assert "1" in pids_in_a and len(pids_in_a) < 8, seen_by_a
    assert str(b["pid"]) not in pids_in_a

    apply(
        cluster,
        tmp_path,
        """
name: hog
image: IMAGE
replicas: 1
resources: {memory: 32Mi}
constraints: ["zone==iso"]
args:
  - sh
  - -c
  - >-
    if [ ! -e /oomed ]; then touch /oomed; exec dd if=/dev/zero of=/dev/shm/f bs=1M count=200; fi;
    exec sleep 600
""",
    )
    hog = wait_for(
        lambda: [r for r in ps(cluster, "hog") if r["restarts"] >= 1 and r["state"] == "running"],
        90,
        "the hog to be OOM-killed and restarted",
    )[0]
    assert "OOM" in hog["reason"], hog
    after = {r["id"]: r for r in ps(cluster, "iso")}
    for row in (a, b):  # the neighbours ran on untouched
        assert after[row["id"]]["pid"] == row["pid"] and after[row["id"]]["restarts"] == 0
    berth(cluster, "service", "rm", "iso", "hog")
    wait_for(lambda: not of_service(containers(cluster), "hog"), 30, "the hog removed")


def test_scale_up_down_and_rm_leave_nothing_behind(cluster: DevCluster, tmp_path: Path) -> None:
    apply(
        cluster,
        tmp_path,
        """
name: scaler
image: IMAGE
replicas: 6
resources: {cpu: 100m, memory: 32Mi}
ports: [8080]
""",
    )
    for count in (6, 9, 2):
        if count != 6:
            berth(cluster, "service", "scale", f"scaler={count}")
        wait_for(lambda n=count: all_running(cluster, "scaler", n), 90, f"{count} scaler replicas in ps")
        real = wait_for(
            lambda n=count: (r := of_service(containers(cluster), "scaler")) and len(r) == n and r,
            60,
            f"exactly {count} scaler containers on the hosts",
        )
        assert len(real) == count
        if count == 9:
            nine = set(real)
    gone = nine - set(real)
    assert len(gone) == 7
    for task_id in gone:
        assert wait_for(lambda t=task_id: not leftovers(cluster, t), 30, f"{task_id} cleaned up")
    berth(cluster, "service", "rm", "scaler")
    wait_for(lambda: not of_service(containers(cluster), "scaler"), 60, "no scaler containers")
    for task_id in nine:
        assert wait_for(lambda t=task_id: not leftovers(cluster, t), 30, f"{task_id} cleaned up")
    listed = json.loads(berth(cluster, "service", "ls", "-o", "json").stdout)
    assert "scaler" not in {s["name"] for s in listed}


def test_unplaceable_task_waits_with_a_reason_until_a_big_host_joins(
    cluster: DevCluster, tmp_path: Path
) -> None:
    apply(
        cluster,
        tmp_path,
        """
name: big
image: IMAGE
replicas: 1
resources: {memory: 100Gi}
""",
    )
    row = wait_for(
        lambda: [r for r in ps(cluster, "big") if r["state"] == "pending" and "memory" in r["reason"]],
        30,
        "a pending reason naming memory",
    )[0]
    assert row["reason"].startswith("0/4 nodes available"), row
    cluster.add_host("h5", memory="128Gi")
    placed = wait_for(lambda: all_running(cluster, "big", 1), 60, "the big task to run on the new host")
    assert placed[0]["node"] == "h5"
    berth(cluster, "service", "rm", "big")


def test_missing_image_shows_the_pull_error_and_nothing_crashes(cluster: DevCluster, tmp_path: Path) -> None:
    berth(
        cluster,
        "service",
        "create",
        "ghost",
        "--image",
        f"{cluster.registry_address}/does-not-exist:1",
        "--replicas",
        "2",
    )
    rows = wait_for(
        lambda: [r for r in ps(cluster, "ghost") if "not found" in r["reason"]],
        60,
        "the pull error as the tasks' reason",
    )
    assert "image pull failed" in rows[0]["reason"]
    status = cluster.status()
    assert all(p["alive"] for p in status["processes"]), status["processes"]
    berth(cluster, "service", "rm", "ghost")


STEADY = """
name: steady
image: IMAGE
replicas: 4
resources: {cpu: 100m, memory: 32Mi}
ports: [8080]
"""


def test_agent_restart_readopts_containers(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, STEADY)
    rows = wait_for(lambda: all_running(cluster, "steady", 4), 60, "steady running")
    before = of_service(containers(cluster), "steady")
    host = rows[0]["node"]
    cluster.stop_agent(host, signal.SIGTERM)
    cluster.start_agent(host)
    wait_for(
        lambda: any(n["name"] == host and n["state"] == "ready" for n in nodes(cluster)), 30, "node ready"
    )
    time.sleep(2)  # give a wrongly restarting agent time to show it
    assert of_service(containers(cluster), "steady") == before
    after = all_running(cluster, "steady", 4)
    assert after is not None and {r["id"]: r["pid"] for r in after} == {t: p for t, (_, p) in before.items()}
    assert all(r["restarts"] == 0 for r in after)


def test_controller_restart_disturbs_nothing(cluster: DevCluster, tmp_path: Path) -> None:
    apply(cluster, tmp_path, STEADY)
    wait_for(lambda: all_running(cluster, "steady", 4), 60, "steady running")
    before_containers = of_service(containers(cluster), "steady")
    before_state = stored(cluster)
    cluster.stop_controller(signal.SIGKILL)
    cluster.start_controller()
    wait_for(
        lambda: len([n for n in nodes(cluster) if n["state"] == "ready"]) == len(cluster.hosts),
        30,
        "all agents reconnected",
    )
    time.sleep(2)
    assert of_service(containers(cluster), "steady") == before_containers
    assert stored(cluster) == before_state
    assert all_running(cluster, "steady", 4)
    berth(cluster, "service", "rm", "steady")


BAD_INPUT = [
    ("negative-replicas", ["service", "create", "bad", "--image", "x:1", "--replicas", "-1"], "replicas"),
    ("bad-quantity", ["service", "create", "bad", "--image", "x:1", "--memory", "lots"], "--memory"),
    ("port-out-of-range", ["service", "create", "bad", "--image", "x:1", "--port", "70000"], "out of range"),
    ("bad-name", ["service", "create", "Bad_Name", "--image", "x:1"], "name"),
    ("duplicate-name", ["service", "create", "dup", "--image", "x:1"], "already exists"),
    ("malformed-yaml", ["service", "apply", "-f", "MALFORMED"], "malformed YAML"),
    ("unknown-field", ["service", "apply", "-f", "UNKNOWN"], "unknown field"),
    ("scale-unknown", ["service", "scale", "nosuch=3"], "not found"),
]


@pytest.mark.parametrize(
    ("args", "expected"), [(a, e) for _, a, e in BAD_INPUT], ids=[i for i, _, _ in BAD_INPUT]
)
def test_bad_input_gives_one_clear_line_and_changes_nothing(
    cluster: DevCluster, tmp_path: Path, args: list[str], expected: str
) -> None:
    if not any(s["name"] == "dup" for s in json.loads(berth(cluster, "service", "ls", "-o", "json").stdout)):
        berth(cluster, "service", "create", "dup", "--image", f"{cluster.image}", "--replicas", "0")
    files = {"MALFORMED": "name: x\nimage: [unclosed\n", "UNKNOWN": "name: x\nimage: i\nreplica: 3\n"}
    for marker, text in files.items():
        (tmp_path / marker).write_text(text)
    args = [str(tmp_path / a) if a in files else a for a in args]
    before = stored(cluster)
    proc = berth(cluster, *args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert stored(cluster) == before


def test_plan_shows_what_apply_then_does(cluster: DevCluster, tmp_path: Path) -> None:
    spec = tmp_path / "planned.yaml"
    spec.write_text(
        f"""
name: planned
image: {cluster.image}
replicas: 5
resources: {{cpu: 300m, memory: 48Mi}}
ports: [8080]
max_per_node: 2
"""
    )
    before = stored(cluster)
    planned = json.loads(berth(cluster, "plan", "-f", str(spec), "-o", "json").stdout)
    assert stored(cluster) == before  # planning changes nothing
    assert not planned["pending"] and len(planned["placements"]) == 5
    assert planned["verdicts"] and all(v["feasible"] for v in planned["verdicts"] if v["node"] != "h5")
    expected = {p["slot"]: p["node"] for p in planned["placements"]}
    assert max(list(expected.values()).count(n) for n in expected.values()) <= 2
    berth(cluster, "service", "apply", "-f", str(spec))
    rows = wait_for(lambda: all_running(cluster, "planned", 5), 60, "planned service running")
    assert {r["slot"]: r["node"] for r in rows} == expected
    # planning the same file again: everything already placed, nothing new
    again = json.loads(berth(cluster, "plan", "-f", str(spec), "-o", "json").stdout)
    assert all(p["existing"] for p in again["placements"]) and not again["removed"]
    berth(cluster, "service", "rm", "planned")


def test_plan_explains_what_cannot_fit(cluster: DevCluster, tmp_path: Path) -> None:
    spec = tmp_path / "nofit.yaml"
    spec.write_text(
        f"""
name: nofit
image: {cluster.image}
replicas: 2
resources: {{gpu: 1}}
---
name: nowhere
image: {cluster.image}
replicas: 1
constraints: ["zone in (mars, venus)"]
"""
    )
    planned = json.loads(berth(cluster, "plan", "-f", str(spec), "-o", "json").stdout)
    reasons = {(w["service"], w["slot"]): w["reasons"][0] for w in planned["pending"]}
    assert "insufficient gpu" in reasons[("nofit", 1)]
    assert "constraint zone in (mars,venus) not met" in reasons[("nowhere", 1)].replace(", ", ",")
    zero = tmp_path / "zero.yaml"
    zero.write_text(f"name: zero\nimage: {cluster.image}\nresources: {{gpu: 0}}\n")
    proc = berth(cluster, "plan", "-f", str(zero), check=False)
    assert proc.returncode != 0 and "resources.scalars.gpu" in proc.stderr and "Traceback" not in proc.stderr
