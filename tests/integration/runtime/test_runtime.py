"""The real runtime (runc, overlayfs, cgroups, bridge + nftables) against real things.

One test "host" (a network namespace with a veth to the root namespace) runs an agent process
holding a ``RuncRuntime``; a throwaway Debian ``docker-registry`` serves a busybox-static image
built with umoci. The tests talk to containers from the host namespace (container IPs, the host's
own address through the ``output`` DNAT chain) and from the root namespace (host address:published
port, through ``prerouting`` DNAT), and look at cgroup files, /proc/mounts, /run/netns and the nft
map directly to check limits and that ``remove`` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

# fixtures come from conftest.py; its types are not importable from a rootdir-less test dir
Host = Any

MiB = 1024 * 1024


def spec(task_id: str, image: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task_id": task_id,
        "service": "web",
        "slot": 1,
        "node_name": "node-a",
        "image": image,
    }
    base.update(kw)
    return base


def run(host: Host, task_id: str, **kw: Any) -> dict[str, Any]:
    image = host.agent.call("pull", ref=host.image)
    host.agent.call("create", spec=spec(task_id, host.image, **kw), image=image)
    started: dict[str, Any] = host.agent.call("start", task_id=task_id)
    return started


def process_gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` is gone or a zombie (re-adopted containers are reaped by init, not us)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def assert_gone(host: Host, task_id: str, ip: str) -> None:
    """Nothing of the container is left: cgroups, mount, bundle, netns, veth, nft element, IP."""
    cg = host.agent.call("cgroup", task_id=task_id)
    assert cg["dirs"] == []
    mounts = Path("/proc/mounts").read_text()
    assert f"/containers/{task_id}/" not in mounts
    assert not (Path(host.config["state_dir"]) / "containers" / task_id).exists()
    names = host.agent.call("names", task_id=task_id)
    assert not (Path("/run/netns") / names["netns"]).exists()
    links = [link["ifname"] for link in json.loads(host.ns("ip", "-j", "link", "show").stdout)]
    assert names["host_if"] not in links
    if ip:
        assert [p for p in host.agent.call("published") if p[2] == ip] == []
        assert not (Path(host.config["state_dir"]) / "ipam" / f"ip-{ip}").exists()
    assert not (Path(host.config["state_dir"]) / "ipam" / f"task-{task_id}").exists()


def test_pull_errors_are_readable(host: Host) -> None:
    with pytest.raises(host.remote_error) as e:
        host.agent.call("pull", ref=f"{host.registry}/berth-test/nope:1")
    assert e.value.type == "ImagePullError"
    assert e.value.reason == f"image {host.registry}/berth-test/nope:1 not found in registry"

    with pytest.raises(host.remote_error) as e:
        host.agent.call("pull", ref=f"{host.registry}/berth-test/bb:no-such-tag")
    assert e.value.reason == f"image {host.registry}/berth-test/bb:no-such-tag not found in registry"

    # nothing listens on port 1 of the root-namespace end of the veth
    with pytest.raises(host.remote_error) as e:
        host.agent.call("pull", ref=f"{host.root_ip}:1/berth-test/bb:1")
    assert e.value.reason == f"registry {host.root_ip}:1 unreachable"


def test_pull_unpacks_once_per_digest(host: Host) -> None:
    futures = [host.agent.submit("pull", ref=host.image) for _ in range(3)]
    infos = [f.result(timeout=120) for f in futures]
    assert len({i["digest"] for i in infos}) == 1
    info = infos[0]
    assert info["digest"].startswith("sha256:")
    assert info["cmd"] == ["httpd", "-f", "-p", "80", "-h", "/www"]
    assert "IMAGE_ENV=from-image" in info["env"]
    assert info["workdir"] == "/www"
    rootfs = Path(info["rootfs"])
    assert rootfs.name == info["digest"].split(":")[1]
    assert (rootfs / "bin" / "busybox").is_file()
    unpacked = [p for p in rootfs.parent.iterdir()]
    assert unpacked == [rootfs]  # no temp dirs left, one rootfs


def test_bridge_containers_ports_limits_and_readoption(host: Host) -> None:
    cmd = ["sh", "-c", "env > /www/env.txt; exec httpd -f -p 80 -h /www"]
    a = run(
        host, "web-a", args=cmd, env={"SPEC_ENV": "from-spec"}, cpu_millis=250, memory_bytes=64 * MiB,
        pids_limit=64, ports=[{"container_port": 80, "host_port": 18080, "protocol": "tcp"}],
    )  # fmt: skip
    b = run(host, "web-b", args=cmd, ports=[{"container_port": 80, "host_port": 18081, "protocol": "tcp"}])
    try:
        assert a["ip"] != b["ip"]
        for c in (a, b):
            assert c["ip"].startswith("10.214.7.")
            assert c["pid"] > 0 and os.path.exists(f"/proc/{c['pid']}")

        # container IPs from the host namespace
        assert host.agent.call("http", host=a["ip"], port=80) == "hello from berth\n"
        assert host.agent.call("http", host=b["ip"], port=80) == "hello from berth\n"
        # published ports from the root namespace (prerouting DNAT) ...
        assert host.http(host.host_ip, 18080) == "hello from berth\n"
        assert host.http(host.host_ip, 18081) == "hello from berth\n"
        # ... and from the host itself (output DNAT)
        assert host.agent.call("http", host=host.host_ip, port=18081) == "hello from berth\n"
        assert host.agent.call("http", host="127.0.0.1", port=18080) == "hello from berth\n"

        env = dict(
            line.split("=", 1)
            for line in host.agent.call("http", host=a["ip"], port=80, path="/env.txt").splitlines()
            if "=" in line
        )
        assert env["IMAGE_ENV"] == "from-image"
        assert env["SPEC_ENV"] == "from-spec"
        assert env["BERTH_TASK_ID"] == "web-a"
        assert env["BERTH_SERVICE"] == "web"
        assert env["BERTH_SLOT"] == "1"
        assert env["BERTH_NODE_NAME"] == "node-a"
        assert env["HOSTNAME"] == "web-a"

        cg = host.agent.call("cgroup", task_id="web-a")
        assert cg["memory_limit"] == 64 * MiB
        assert cg["cpu_quota"] == [25000, 100000]
        assert cg["cpu_shares"] == 256
        assert cg["pids_limit"] == 64
        assert host.agent.call("cgroup", task_id="web-b")["memory_limit"] is None

        # a host port in use is refused, and the failed create leaves nothing behind
        image = host.agent.call("pull", ref=host.image)
        with pytest.raises(host.remote_error) as e:
            clash = spec("web-c", host.image, ports=[{"container_port": 80, "host_port": 18080}])
            host.agent.call("create", spec=clash, image=image)
        assert "already published" in e.value.reason
        assert host.http(host.host_ip, 18080) == "hello from berth\n"

        # agent crash + restart: containers keep running and are found again with the same pid
        host.restart_agent()
        records = {r["spec"]["task_id"]: r for r in host.agent.call("list")}
        assert set(records) >= {"web-a", "web-b"}
        assert "web-c" not in records
        for c in (a, b):
            rec = records[c["task_id"]]
            assert rec["running"] is not None
            assert rec["running"]["pid"] == c["pid"]
            assert rec["ip"] == c["ip"]
            assert rec["running"]["started_at"] == pytest.approx(c["started_at"])
        assert records["web-a"]["spec"]["memory_bytes"] == 64 * MiB
        assert records["web-a"]["spec"]["ports"] == [
            {"container_port": 80, "host_port": 18080, "protocol": "tcp"}
        ]

        # a re-adopted container can be waited for (exit code unknown) and stopped
        waiter = host.agent.submit("wait", task_id="web-b")
        time.sleep(0.2)
        assert not waiter.done()
        host.agent.call("stop", task_id="web-b", timeout=1.0)
        status = waiter.result(timeout=30)
        assert status["exit_code"] is None and not status["oom_killed"]

        # removing one container leaves the other's port mapping alone
        host.agent.call("remove", task_id="web-b")
        assert host.http(host.host_ip, 18080) == "hello from berth\n"
        assert_gone(host, "web-b", b["ip"])
    finally:
        host.agent.call("remove", task_id="web-a")
        host.agent.call("remove", task_id="web-b")
    assert_gone(host, "web-a", a["ip"])
    assert process_gone(a["pid"])
    assert host.agent.call("list") == []


def test_exit_codes_restart_and_logs(host: Host) -> None:
    c = run(host, "job-1", args=["sh", "-c", "echo run-$BERTH_SLOT; exit 3"])
    try:
        assert host.agent.call("wait", task_id="job-1") == {
            "exit_code": 3,
            "oom_killed": False,
            "signal": None,
        }
        again = host.agent.call("start", task_id="job-1")
        assert again["ip"] == c["ip"]
        assert host.agent.call("wait", task_id="job-1")["exit_code"] == 3
        bundle = Path(host.config["state_dir"]) / "containers" / "job-1"
        assert (bundle / "stdout.log").read_text().splitlines().count("run-1") == 2

        # what a host reboot loses (overlay mount, /run/netns) is re-made by the next start
        subprocess.run(["umount", str(bundle / "rootfs")], check=True)
        subprocess.run(["ip", "netns", "del", host.agent.call("names", task_id="job-1")["netns"]], check=True)
        third = host.agent.call("start", task_id="job-1")
        assert third["ip"] == c["ip"]
        assert host.agent.call("wait", task_id="job-1")["exit_code"] == 3
        assert (bundle / "stdout.log").read_text().splitlines().count("run-1") == 3
        rec = host.agent.call("list")[0]
        assert rec["spec"]["task_id"] == "job-1" and rec["running"] is None
    finally:
        host.agent.call("remove", task_id="job-1")
    assert_gone(host, "job-1", c["ip"])


def test_stop_escalates_to_sigkill(host: Host) -> None:
    # sh as pid 1 of its namespace ignores SIGTERM: stop() must fall back to SIGKILL
    run(host, "sleeper", args=["sh", "-c", "sleep 1000"])
    try:
        waiter = host.agent.submit("wait", task_id="sleeper")
        t0 = time.monotonic()
        host.agent.call("stop", task_id="sleeper", timeout=1.0)
        assert 0.9 < time.monotonic() - t0 < 8
        status = waiter.result(timeout=10)
        assert status == {"exit_code": 137, "oom_killed": False, "signal": 9}
    finally:
        host.agent.call("remove", task_id="sleeper")


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_stop_while_runc_makes_the_container_finds_and_kills_it(host: Host, when: str) -> None:
    """A stop that lands while `runc run` is still making the container must find the container
    runc made and kill it, whether it comes after the cancelled start (the runner's stop) or
    while it is being cancelled (the watchdog hurrying a stop under way): nothing may run on
    unseen, and nothing be left behind."""
    image = host.agent.call("pull", ref=host.image)
    marker = [b"sleep", b"424217", b""]  # the container's command line, which nothing else runs
    caught = []
    for attempt in range(3):
        task_id = f"cancelled-{when}-{attempt}"
        args = [a.decode() for a in marker[:2]]
        host.agent.call("create", spec=spec(task_id, host.image, args=args), image=image)
        try:
            outcome = host.agent.call("start_stopped", task_id=task_id, when=when)
        finally:
            host.agent.call("remove", task_id=task_id)
        if outcome["caught"]:  # the start was cancelled while runc ran
            caught.append(attempt)
            if when == "after":
                assert outcome["found"] is not None, (
                    f"attempt {attempt}: the stop found no container: {outcome['why']}"
                )
            assert outcome["left"] is None, f"attempt {attempt}: the container ran on after the stop"
        found = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _cmdline(p).split(b"\0") == marker
        ]
        running = [pid for pid in found if not process_gone(pid, 2.0)]
        assert running == [], f"attempt {attempt}: the container runs on after its start was cancelled"
        assert_gone(host, task_id, "")
    # (each attempt waits for `runc run` to show up; one that missed it only tested a late stop)
    assert caught, "no stop landed while runc run was making the container"


def _cmdline(proc: Path) -> bytes:
    try:
        return proc.joinpath("cmdline").read_bytes()
    except OSError:
        return b""


def test_memory_limit_oom_kill(host: Host) -> None:
    # tmpfs pages count against the memory cgroup and cannot be reclaimed without swap
    c = run(
        host, "hog", memory_bytes=32 * MiB,
        args=["sh", "-c", "exec dd if=/dev/zero of=/dev/shm/fill bs=1M count=200"],
    )  # fmt: skip
    try:
        assert host.agent.call("cgroup", task_id="hog")["memory_limit"] == 32 * MiB
        status = host.agent.call("wait", task_id="hog", rpc_timeout=60)
        assert status == {"exit_code": 137, "oom_killed": True, "signal": 9}
    finally:
        host.agent.call("remove", task_id="hog")
    assert_gone(host, "hog", c["ip"])


def test_host_network(host: Host) -> None:
    c = run(
        host, "hostnet", network="host", args=["httpd", "-f", "-p", "18090", "-h", "/www"],
        ports=[{"container_port": 18090, "host_port": 18090, "protocol": "tcp"}],
    )  # fmt: skip
    try:
        assert c["ip"] == ""
        assert host.http(host.host_ip, 18090) == "hello from berth\n"
        assert host.agent.call("published") == []
        ns = [p.name for p in Path("/run/netns").iterdir() if p.name.startswith(host.config["nft_table"])]
        assert ns == []
    finally:
        host.agent.call("remove", task_id="hostnet")
    assert host.agent.call("cgroup", task_id="hostnet")["dirs"] == []


def test_remove_is_idempotent_and_host_teardown(host: Host) -> None:
    host.agent.call("remove", task_id="never-created")
    c = run(host, "tmp-1")
    pid = c["pid"]
    host.agent.call("remove", task_id="tmp-1")
    host.agent.call("remove", task_id="tmp-1")
    assert process_gone(pid)
    assert_gone(host, "tmp-1", c["ip"])

    host.agent.call("teardown_host")
    links = [link["ifname"] for link in json.loads(host.ns("ip", "-j", "link", "show").stdout)]
    assert "berth0" not in links
    tables = host.ns("nft", "list", "tables").stdout
    assert host.config["nft_table"] not in tables
    # containers created afterwards bring the host side back
    c2 = run(host, "tmp-2", ports=[{"container_port": 80, "host_port": 18085, "protocol": "tcp"}])
    try:
        assert host.http(host.host_ip, 18085) == "hello from berth\n"
    finally:
        host.agent.call("remove", task_id="tmp-2")
    assert_gone(host, "tmp-2", c2["ip"])


def test_user_resolution_from_image_rootfs(tmp_path: Path) -> None:
    from berth.agent.runc import resolve_user
    from berth.agent.runtime import ContainerError

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nwww:x:1000:1001::/www:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user("", tmp_path) == (0, 0)
    assert resolve_user("www", tmp_path) == (1000, 1001)
    assert resolve_user("1000", tmp_path) == (1000, 1001)
    assert resolve_user("1234", tmp_path) == (1234, 0)
    assert resolve_user("www:staff", tmp_path) == (1000, 50)
    assert resolve_user("5:6", tmp_path) == (5, 6)
    with pytest.raises(ContainerError):
        resolve_user("nobody", tmp_path)


def test_skopeo_errors_become_one_line_reasons() -> None:
    from berth.agent.images import describe_skopeo_error, normalize

    ref = "10.0.0.1:5000/x:1"
    http = 'time="..." level=fatal msg="... http: server gave HTTP response to HTTPS client"'
    assert (
        describe_skopeo_error(ref, http)[0]
        == "registry 10.0.0.1:5000 speaks plain HTTP; list it as an insecure registry"
    )
    denied = 'level=fatal msg="... requested access to the resource is denied"'
    assert (
        describe_skopeo_error(ref, denied)[0]
        == "access to image 10.0.0.1:5000/x:1 denied by registry 10.0.0.1:5000"
    )
    assert describe_skopeo_error(ref, 'level=fatal msg="something odd"') == (
        "pulling 10.0.0.1:5000/x:1 failed: something odd",
        True,
    )
    assert normalize("busybox") == "busybox:latest"
    assert normalize("localhost:5000/a/b") == "localhost:5000/a/b:latest"
    assert normalize("r:5000/a@sha256:" + "0" * 64) == "r:5000/a@sha256:" + "0" * 64
