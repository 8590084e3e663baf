"""Fixtures for the real-runtime tests: a registry, a busybox image, and an agent in its own netns.

The runtime must run *inside* the network namespace of a test "host" (its bridge, NAT table and
container namespaces live there), so the agent side runs as a separate process started with
``nsenter --net=/run/netns/<host>``: this file doubles as that process (``python conftest.py
CONFIG``), a small JSON-lines RPC server around one ``RuncRuntime``. The test process stays in the
root namespace and plays "the rest of the world": it reaches the host over a veth pair, and it can
kill and restart the agent process to check re-adoption.

Everything created here carries the run's unique prefix (``brt<hex>``), and anything left by an
earlier crashed run with the ``brt`` prefix is swept at start and again at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SWEEP_PREFIX = "brt"
STATE_BASE = Path("/tmp/berth-runtime-tests")
REPO = Path(__file__).resolve().parents[3]
PYTHON = REPO / ".venv" / "bin" / "python"
CONTAINER_SUBNET = "10.214.7.0/24"


# ---------------------------------------------------------------------------------------------------
# The agent-side RPC server (runs inside the host netns)
# ---------------------------------------------------------------------------------------------------


def http_get(host: str, port: int, path: str = "/", timeout: float = 2.0) -> str:
    """GET without proxies, redirects or name resolution; returns the body (raises on failure)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks).decode(errors="replace")
    head, _, body = raw.partition("\r\n\r\n")
    if " 200 " not in head.split("\r\n", 1)[0]:
        raise OSError(f"HTTP error: {head.splitlines()[0] if head else raw[:80]!r}")
    return body


def http_get_retry(host: str, port: int, path: str = "/", deadline: float = 10.0) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            return http_get(host, port, path)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _wait_for_runc_run(task_id: str, timeout: float) -> int:
    """The pid of a `runc ... run ... <task_id>` process, once one shows up (0: none did)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in argv and task_id.encode() in argv and argv[0].endswith(b"runc"):
                return int(proc.name)
        time.sleep(0.001)
    return 0


def _alive(pid: int) -> bool:
    """Running, not gone and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _serve(config: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO))
    from berth.agent.runc import RuncRuntime
    from berth.agent.runtime import ContainerSpec, ImageInfo, PortBinding, RuntimeFailure

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runtime = RuncRuntime(
        state_dir=Path(config["state_dir"]),
        cgroup_parent=config["cgroup_parent"],
        bridge=config["bridge"],
        subnet=config["subnet"],
        nft_table=config["nft_table"],
        insecure_registries=config["insecure_registries"],
    )
    out_lock = threading.Lock()

    def reply(msg: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    def spec_of(d: dict[str, Any]) -> ContainerSpec:
        d = dict(d)
        d["args"] = tuple(d.get("args", ()))
        d["ports"] = tuple(PortBinding(**p) for p in d.get("ports", ()))
        return ContainerSpec(**d)

    async def handle(req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "pull":
            return dataclasses.asdict(await runtime.pull(req["ref"]))
        if op == "create":
            await runtime.create(spec_of(req["spec"]), ImageInfo(**{**req["image"]}))
            return None
        if op == "start":
            return dataclasses.asdict(await runtime.start(req["task_id"]))
        if op == "start_stopped":
            # start, and stop while `runc run` is making the container. "after": as the agent's
            # runner does (cancel the start, then stop); "during": a stop racing the cancelled
            # start, as the watchdog's hurried kill of a stop under way. Says whether the cancel
            # landed while runc ran (`caught`) and which container pid the stop could find
            # (`found`, None if none; only "after") or was left running once it returned (`left`)
            task_id = req["task_id"]
            starting = asyncio.create_task(runtime.start(task_id))
            runc_pid = await asyncio.to_thread(_wait_for_runc_run, task_id, 10.0)
            starting.cancel()
            await asyncio.sleep(0)  # the start has been handed its cancellation
            running = runc_pid > 0 and _alive(runc_pid)
            found = None
            if req["when"] == "during":
                await runtime.stop(task_id, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, RuntimeFailure):
                await starting
            why = ""
            if req["when"] == "after":
                found = await runtime._current_pid(task_id)
                if found is None:  # (for the failure message: what runc said and left)
                    bundle = runtime.bundle(task_id)
                    runc_log = bundle / "runc.log"
                    tail = runc_log.read_text()[-600:] if runc_log.exists() else ""
                    state = await runtime._state(task_id)
                    ran = (bundle / "run.json").exists()
                    why = f"runc state {state}; run.json {ran}; runc.log {tail!r}"
                await runtime.stop(task_id, timeout=1.0)
            left = await runtime._current_pid(task_id)  # (a killed one may await its reaping)
            left = left if left is not None and _alive(left) else None
            await runtime.remove(task_id)
            return {"caught": running and starting.cancelled(), "found": found, "left": left, "why": why}
        if op == "wait":
            return dataclasses.asdict(await runtime.wait(req["task_id"]))
        if op == "stop":
            await runtime.stop(req["task_id"], timeout=req.get("timeout", 10.0))
            return None
        if op == "remove":
            await runtime.remove(req["task_id"])
            return None
        if op == "list":
            return [dataclasses.asdict(r) for r in await runtime.list()]
        if op == "http":
            return await asyncio.to_thread(http_get_retry, req["host"], req["port"], req.get("path", "/"))
        if op == "cgroup":
            cg, t = runtime.cgroups, req["task_id"]
            return {
                "memory_limit": cg.memory_limit(t),
                "cpu_quota": cg.cpu_quota(t),
                "cpu_shares": cg.cpu_shares(t),
                "pids_limit": cg.pids_limit(t),
                "dirs": [str(d) for d in cg.all_dirs(t) if d.exists()],
            }
        if op == "names":
            net = runtime.network
            return {"netns": net.netns_name(req["task_id"]), "host_if": net.host_if(req["task_id"])}
        if op == "published":
            return await runtime.network.published()
        if op == "setup_host":
            await runtime.setup_host()
            return None
        if op == "teardown_host":
            await runtime.teardown_host()
            return None
        raise ValueError(f"unknown op {op}")

    async def run_one(req: dict[str, Any]) -> None:
        try:
            reply({"id": req["id"], "ok": await handle(req)})
        except RuntimeFailure as e:
            reply({"id": req["id"], "error": {"type": type(e).__name__, "reason": e.reason}})
        except Exception as e:
            logging.exception("op %s failed", req.get("op"))
            reply({"id": req["id"], "error": {"type": type(e).__name__, "reason": str(e)}})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        reply({"id": 0, "ok": "ready"})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            t = asyncio.create_task(run_one(json.loads(line)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------
# Test-process side
# ---------------------------------------------------------------------------------------------------


class RemoteError(Exception):
    def __init__(self, type_: str, reason: str) -> None:
        super().__init__(f"{type_}: {reason}")
        self.type = type_
        self.reason = reason


class Agent:
    """Client of one agent RPC process running in the host netns."""

    def __init__(self, netns: str, config: dict[str, Any], log_path: Path) -> None:
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", str(PYTHON), __file__, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            cwd=REPO,
        )
        self._next = 0
        self._pending: dict[int, concurrent.futures.Future[Any]] = {0: concurrent.futures.Future()}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._pending_ready = self._pending[0]
        self._pending_ready.result(timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is None:
                continue
            if "error" in msg:
                fut.set_exception(RemoteError(msg["error"]["type"], msg["error"]["reason"]))
            else:
                fut.set_result(msg["ok"])
        with self._lock:
            for fut in self._pending.values():
                fut.set_exception(RemoteError("AgentGone", "agent process exited"))
            self._pending.clear()

    def submit(self, op: str, **kw: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._next += 1
            rid = self._next
            self._pending[rid] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return fut

    def call(self, op: str, rpc_timeout: float = 120.0, **kw: Any) -> Any:
        return self.submit(op, **kw).result(timeout=rpc_timeout)

    def kill(self) -> None:
        """SIGKILL, like a crashed agent: containers must keep running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self.log_file.close()


@dataclasses.dataclass
class Host:
    rid: str
    netns: str
    root_if: str
    root_ip: str  # root-namespace end of the veth (the registry listens here)
    host_ip: str  # the host's address (agent netns end)
    state_dir: Path
    config: dict[str, Any]
    registry: str  # host:port
    image: str  # reference of the test image
    agent: Agent

    remote_error = RemoteError

    def http(self, ip: str, port: int, path: str = "/") -> str:
        """GET from the root namespace (retrying while the server starts)."""
        return http_get_retry(ip, port, path)

    def restart_agent(self) -> None:
        self.agent.kill()
        self.agent = Agent(self.netns, self.config, self.state_dir / "agent.log")

    def ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, check=check
        )


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def sweep(prefix: str) -> None:
    """Remove every trace of runs whose names start with ``prefix``."""
    # containers first (they hold mounts and cgroups), then mounts, netns, links, cgroups, dirs
    if STATE_BASE.exists():
        for d in STATE_BASE.iterdir():
            if not d.name.startswith(prefix):
                continue
            root = d / "runc"
            if root.exists():
                out = sh("runc", "--root", str(root), "list", "-q", check=False).stdout.split()
                for cid in out:
                    sh("runc", "--root", str(root), "delete", "--force", cid, check=False)
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        target = line.split()[1]
        if target.startswith(f"{STATE_BASE}/{prefix}"):
            sh("umount", "-l", target, check=False)
    netns_dir = Path("/run/netns")
    if netns_dir.exists():
        for ns in netns_dir.iterdir():
            if ns.name.startswith(prefix):
                sh("ip", "netns", "del", ns.name, check=False)
    for link in json.loads(sh("ip", "-j", "link", "show").stdout or "[]"):
        if str(link.get("ifname", "")).startswith(prefix):
            sh("ip", "link", "del", link["ifname"], check=False)
    tables = json.loads(sh("nft", "-j", "list", "tables").stdout or "{}").get("nftables", [])
    for t in tables:
        if "table" in t and t["table"]["name"].startswith(prefix):
            sh("nft", "delete", "table", t["table"]["family"], t["table"]["name"], check=False)
    for hier in Path("/sys/fs/cgroup").iterdir():
        for base in [hier, *(p for p in hier.iterdir() if p.is_dir())] if hier.is_dir() else []:
            for cg in list(base.glob(f"{prefix}*")) if base.is_dir() else []:
                for sub in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    cg.rmdir()
    if STATE_BASE.exists():
        for d in STATE_BASE.iterdir():
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)


def leftovers(prefix: str) -> list[str]:
    """Names of everything still present for ``prefix`` in the root namespace view."""
    found = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if prefix in ln]
    netns_dir = Path("/run/netns")
    if netns_dir.exists():
        found += [f"netns {ns.name}" for ns in netns_dir.iterdir() if ns.name.startswith(prefix)]
    for hier in Path("/sys/fs/cgroup").iterdir():
        if hier.is_dir():
            found += [str(p) for p in hier.glob(f"{prefix}*")]
    return found


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _pick_link_net() -> ipaddress.IPv4Network:
    routes = sh("ip", "-4", "route", "show").stdout
    for _ in range(50):
        net = ipaddress.IPv4Network(f"10.253.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
        if str(net.network_address).rsplit(".", 1)[0] + "." not in routes:
            return net
    raise RuntimeError("no free 10.253.x.y/30 link network")


def _start_registry(workdir: Path, ip: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port(ip)
    cfg = workdir / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry-data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {ip}:{port}\n"
    )
    log = open(workdir / "registry.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            http_get(ip, port, "/v2/")
            return proc, f"{ip}:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"registry did not start; see {workdir / 'registry.log'}") from None
            time.sleep(0.1)


def _build_image(workdir: Path, registry: str) -> str:
    """A busybox-static image: httpd serving /www by default; pushed as <registry>/berth-test/bb:1."""
    rootfs = workdir / "img-rootfs"
    for d in ("bin", "etc", "www", "tmp", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in sh("/bin/busybox", "--list").stdout.split():
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nwww:x:1000:\nnogroup:x:65534:\n")
    (rootfs / "www" / "index.html").write_text("hello from berth\n")
    layout = workdir / "oci"
    img = f"{layout}:1"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", img)
    sh("umoci", "insert", "--image", img, str(rootfs), "/")
    sh(
        "umoci", "config", "--image", img,
        "--config.cmd", "httpd", "--config.cmd", "-f", "--config.cmd", "-p", "--config.cmd", "80",
        "--config.cmd", "-h", "--config.cmd", "/www",
        "--config.env", "PATH=/bin", "--config.env", "IMAGE_ENV=from-image",
        "--config.workingdir", "/www",
    )  # fmt: skip
    ref = f"{registry}/berth-test/bb:1"
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{img}", f"docker://{ref}")
    return ref


def _make_host() -> Iterator[Host]:
    sweep(SWEEP_PREFIX)
    rid = SWEEP_PREFIX + secrets.token_hex(3)
    state_dir = STATE_BASE / rid
    state_dir.mkdir(parents=True)
    netns, root_if, ns_if = f"{rid}-h", f"{rid}r", f"{rid}n"
    link = _pick_link_net()
    root_ip, host_ip = (str(a) for a in list(link.hosts())[:2])
    registry_proc: subprocess.Popen[bytes] | None = None
    host: Host | None = None
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if, "netns", netns)
        sh("ip", "addr", "add", f"{root_ip}/30", "dev", root_if)
        sh("ip", "link", "set", root_if, "up")
        sh("ip", "-n", netns, "addr", "add", f"{host_ip}/30", "dev", ns_if)
        sh("ip", "-n", netns, "link", "set", ns_if, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", root_ip)
        registry_proc, registry = _start_registry(state_dir, root_ip)
        image = _build_image(state_dir, registry)
        config = {
            "state_dir": str(state_dir / "agent"),
            "cgroup_parent": f"{rid}-agent/containers",
            "bridge": "berth0",
            "subnet": CONTAINER_SUBNET,
            "nft_table": f"{rid}_agent",
            "insecure_registries": [registry],
        }
        agent = Agent(netns, config, state_dir / "agent.log")
        host = Host(rid, netns, root_if, root_ip, host_ip, state_dir, config, registry, image, agent)
        yield host
    finally:
        if host is not None:
            with contextlib.suppress(Exception):
                for rec in host.agent.call("list", rpc_timeout=30):
                    host.agent.call("remove", task_id=rec["spec"]["task_id"], rpc_timeout=60)
                host.agent.call("teardown_host", rpc_timeout=30)
            host.agent.kill()
        if registry_proc is not None:
            registry_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                registry_proc.wait(timeout=10)
            if registry_proc.poll() is None:
                registry_proc.kill()
                registry_proc.wait()
        sweep(rid)
        remaining = leftovers(rid)
        if remaining:
            logging.getLogger(__name__).warning("leftovers after runtime tests: %s", remaining)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
else:
    import pytest

    @pytest.fixture(scope="session")
    def host() -> Iterator[Host]:
        if os.geteuid() != 0:
            pytest.skip("runtime integration tests need root")
        for tool in ("runc", "skopeo", "umoci", "nft", "ip", "nsenter", "docker-registry"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")
        yield from _make_host()
