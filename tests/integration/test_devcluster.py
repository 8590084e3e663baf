"""The dev cluster machinery against the real kernel, etcd, registry, skopeo and umoci.

The controller and the agents are replaced, in the second test, by a FAKE program (clearly named so)
that records how it was started and, for the controller, listens on its ports: this checks the
orchestration (namespaces, command lines, restarts, teardown of what agents leave behind) without
depending on the real components. Every cluster has a unique name ``dt<pid>``; leftovers of earlier
crashed runs (whose pid is gone) are swept first, and each test checks that ``down()`` left nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from berth.cli.devcluster import DevCluster, DevClusterConfig, DevClusterError

pytestmark = pytest.mark.integration

BASE_DIR = Path("/var/tmp/berth-devtest")
TOOLS = ("etcd", "docker-registry", "skopeo", "umoci", "nsenter", "ip", "nft", "busybox")

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, cgroups)", allow_module_level=True)
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    pytest.skip(f"missing tools: {', '.join(_missing)}", allow_module_level=True)


def _owner_alive(name: str) -> bool:
    """Clusters are named dt<pid>[x]: keep those whose test process still runs (another session's run)."""
    digits = "".join(c for c in name[2:] if c.isdigit())
    if not digits:
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports, each with its successor free too (etcd uses port and port+1)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    while len(chosen) < n:
        p = rng.randrange(20000, 30000, 2)
        if p not in chosen and _port_pair_free(p):
            chosen.append(p)
    return chosen


def _free_subnet_index() -> int:
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    for k in range(9, 0, -1):
        if not any(line.startswith((f"10.{210 + k}.", f"10.{220 + k}.")) for line in routes.splitlines()):
            return k
    pytest.skip("no free dev-cluster subnet (10.211-219 all in use)")


def _config(suffix: str) -> DevClusterConfig:
    etcd, registry, controller = _free_ports(3)
    return DevClusterConfig(
        name=f"dt{os.getpid()}{suffix}", hosts=2, base_dir=BASE_DIR, etcd_port=etcd, registry_port=registry,
        controller_port=controller, subnet_index=_free_subnet_index(),
    )


def _traces(name: str) -> list[str]:
    """Everything on the machine that still carries the cluster's name."""
    found: list[str] = []
    for ns in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        if ns.startswith((f"berth-{name}-", f"berth_{name}_")):
            found.append(f"netns {ns}")
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    for link in links:
        if name in link.get("ifname", "") or name in link.get("ifalias", ""):
            found.append(f"link {link['ifname']}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {t}" for t in tables.splitlines() if name in t]
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    cgroup_roots = {m.split()[1] for m in mounts if m.split()[2] in ("cgroup", "cgroup2")}
    for root in cgroup_roots:
        for dirpath, dirnames, _ in os.walk(root):
            found += [f"cgroup {dirpath}/{d}" for d in dirnames if d.startswith(f"berth-{name}-")]
    found += [f"mount {m.split()[1]}" for m in mounts if m.split()[1].startswith(str(BASE_DIR / name))]
    if (BASE_DIR / name).exists():
        found.append(f"dir {BASE_DIR / name}")
    marker = f"BERTH_DEV_CLUSTER={name}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if marker in env and stat.rsplit(")", 1)[1].split()[0] not in "ZX":
            found.append(f"process {pid}")
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    found += [f"route {r}" for r in routes.splitlines() if f"bb-{name}" in r]
    return found


@pytest.fixture(scope="module", autouse=True)
def _sweep_leftovers() -> Iterator[None]:
    DevCluster.sweep("dt", BASE_DIR, skip=_owner_alive)
    yield
    DevCluster.sweep(f"dt{os.getpid()}", BASE_DIR)


def _get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return bytes(resp.read())


def _in_netns(cluster: DevCluster, host: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={cluster.netns_path(host)}", *argv],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout


def test_up_without_agents_serves_image_to_hosts_and_down_leaves_nothing() -> None:
    config = replace(_config("a"), start_controller=False, start_agents=False)
    cluster = DevCluster(config)
    lines: list[str] = []
    try:
        cluster.up(progress=lines.append)
        assert any("etcd" in line for line in lines)

        assert json.loads(_get(f"http://127.0.0.1:{config.etcd_port}/health"))["health"] == "true"

        ref = cluster.image
        assert ref == f"{cluster.registry_address}/portal:1.0"
        assert cluster.registry_address == f"10.{210 + config.subnet_index}.0.1:{config.registry_port}"
        inspect = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{ref}"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        image_config = json.loads(inspect.stdout)["config"]
        assert image_config["Entrypoint"] == ["/portal/start.sh"]
        assert "PORT=8080" in image_config["Env"]
        assert "8080/tcp" in image_config["ExposedPorts"]

        for i, host in enumerate(("h1", "h2"), start=1):
            assert cluster.netns(host) == f"berth-{config.name}-{host}"
            assert cluster.host_address(host) == f"10.{210 + config.subnet_index}.0.{10 + i}"
            body = _in_netns(cluster, host, "busybox", "wget", "-q", "-O-",
                             f"http://{cluster.registry_address}/v2/")
            assert body.strip() == "{}"
            addr = _in_netns(cluster, host, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
            assert cluster.host_address(host) in addr

        st = cluster.status()
        assert st["up"] is True
        assert {p["name"] for p in st["processes"]} == {"etcd", "registry"}
        assert all(p["alive"] for p in st["processes"])
        assert [h["name"] for h in st["hosts"]] == ["h1", "h2"]
        # a second object (like the CLI's) sees the same cluster, and up() refuses to run twice
        again = DevCluster(DevClusterConfig(name=config.name, base_dir=BASE_DIR))
        assert again.registry_address == cluster.registry_address
        with pytest.raises(DevClusterError, match="already up"):
            again.up()
    finally:
        cluster.down()
    assert _traces(config.name) == []
    cluster.down()  # safe when already down


_FAKE = '''#!{python}
# FAKE controller/agent for the dev cluster test: records how it was started; the fake controller
# listens on its --listen addresses. Exits on SIGTERM.
import json, os, signal, socket, sys, time
args = sys.argv[1:]
module, rest = args[1], args[2:]
opts = {{}}
for k, v in zip(rest[::2], rest[1::2]):
    opts.setdefault(k, []).append(v)
who = opts.get("--name", ["controller"])[0]
record = os.path.join(os.environ["BERTH_FAKE_RECORD"], module + "-" + who + ".json")
with open(record, "w") as f:
    json.dump({{"argv": args, "netns": os.readlink("/proc/self/ns/net"), "pid": os.getpid()}}, f)
socks = []
if module == "berth.controller":
    for addr in opts.get("--listen", []):
        host, port = addr.rsplit(":", 1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen()
        socks.append(s)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
'''


def _record(tmp: Path, module: str, who: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    path = tmp / f"{module}-{who}.json"
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    data: dict[str, object] = json.loads(path.read_text())
    path.unlink()
    return data


def _netns_id(cluster: DevCluster, host: str) -> str:
    return f"net:[{os.stat(cluster.netns_path(host)).st_ino}]"


def test_fake_agents_restart_join_and_down_removes_what_they_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text(_FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("BERTH_FAKE_RECORD", str(tmp_path))
    config = replace(_config("b"), python=str(fake), build_image=False, host_memory="2Gi")
    cluster = DevCluster(config)
    container: subprocess.Popen[bytes] | None = None
    try:
        cluster.up()
        ctl = _record(tmp_path, "berth.controller", "controller")
        argv = ctl["argv"]
        assert argv == ["-m", "berth.controller", "--etcd", f"http://127.0.0.1:{config.etcd_port}",
                        "--listen", cluster.controller_address,
                        "--listen", f"{cluster.bridge_ip}:{config.controller_port}", "--prefix", "/berth/"]

        for host in ("h1", "h2"):
            rec = _record(tmp_path, "berth.agent", host)
            assert rec["netns"] == _netns_id(cluster, host)  # runs in the host's network namespace
            a = rec["argv"]
            assert isinstance(a, list)
            assert a[a.index("--controller") + 1] == f"{cluster.bridge_ip}:{config.controller_port}"
            assert a[a.index("--address") + 1] == cluster.host_address(host)
            assert a[a.index("--cgroup-parent") + 1] == f"berth-{config.name}-{host}"
            assert a[a.index("--insecure-registry") + 1] == cluster.registry_address
            assert a[a.index("--memory") + 1] == "2Gi"
            assert cluster.agent_alive(host)
            # the agent must see the controller at the bridge IP from inside its namespace
            target = (cluster.bridge_ip, config.controller_port)
            probe = f"import socket; socket.create_connection({target!r}, 3)"
            _in_netns(cluster, host, sys.executable, "-c", probe)

        # restart an agent; SIGKILL another
        cluster.stop_agent("h1")
        assert not cluster.agent_alive("h1")
        cluster.start_agent("h1")
        assert _record(tmp_path, "berth.agent", "h1")["netns"] == _netns_id(cluster, "h1")
        cluster.stop_agent("h2", signal.SIGKILL)
        assert not cluster.agent_alive("h2")

        # restart the controller
        cluster.stop_controller()
        assert not any(p["alive"] for p in cluster.status()["processes"] if p["name"] == "controller")
        cluster.start_controller()
        _record(tmp_path, "berth.controller", "controller")

        # a big host joins
        big = cluster.add_host(cpus="16", memory="64Gi", labels={"size": "big"})
        assert big.name == "h3"
        rec = _record(tmp_path, "berth.agent", "h3")
        a = rec["argv"]
        assert isinstance(a, list)
        assert a[a.index("--cpus") + 1] == "16" and a[a.index("--label") + 1] == "size=big"
        assert big.subnet == f"10.{220 + config.subnet_index}.3.0/24"

        # what an agent leaves: a "container" process in its cgroup parent, a mount in its state dir
        cg = Path("/sys/fs/cgroup/pids") / f"berth-{config.name}-h1" / "c1"
        cg.mkdir(parents=True)
        container = subprocess.Popen(["sleep", "600"], start_new_session=True)
        (cg / "cgroup.procs").write_text(str(container.pid))
        mnt = Path(cluster.host("h1").state_dir) / "rootfs"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "berth-test", str(mnt)], check=True)
        # and a container netns, named as the agent names them: <its nft table>-<hash>
        subprocess.run(["ip", "netns", "add", f"{cluster.host('h1').nft_table}-0123456789ab"], check=True)
    finally:
        cluster.down()
        if container is not None:
            assert container.wait(10) == -signal.SIGKILL
    assert _traces(config.name) == []
