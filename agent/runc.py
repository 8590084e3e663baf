"""The real ``ContainerRuntime``: OCI bundles run by runc (the only module that runs ``runc``).

Layout under ``state_dir``::

    images/          ImageStore (OCI layout cache + one unpacked rootfs per manifest digest)
    ipam/            address claims (HostNetwork)
    runc/            runc's own state (``runc --root``), so agents sharing a machine never collide
    containers/<id>/ the bundle: config.json, rootfs (overlay mount), upper/, work/, hosts,
                     resolv.conf, stdout.log, berth.json (spec, digest, ip: what ``list`` reads
                     back after an agent restart), run.json (pid and start time of the last start)

Exit detection uses a pidfd (works for any process, so also for containers re-adopted after an
agent restart) read from the event loop. The agent process makes itself a child subreaper: the
container's init is orphaned when ``runc run --detach`` exits and is re-parented to us, so for
containers this process started we can ``waitpid`` the real exit status (and must, or they stay
zombies). After a restart the exit code is unknown (``None``); OOM kills are read from the cgroup
either way.

Every external command runs through ``asyncio.create_subprocess_exec`` with an argv list; nothing
from a spec ever reaches a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from berth.agent import overlay
from berth.agent.cgroups import Cgroups
from berth.agent.images import ImageStore
from berth.agent.network import HostNetwork
from berth.agent.runtime import (
    ContainerError,
    ContainerRecord,
    ContainerSpec,
    ExitStatus,
    ImageInfo,
    PortBinding,
    RunningContainer,
)

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNC_RUN_GRACE = 30.0  # a start cancelled during `runc run` waits this long for it to finish
# Docker's default capability set: what common images (nginx, postgres, ...) expect to have.
_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip

_subreaper_set = False


def become_subreaper() -> None:
    """Make this process adopt orphaned descendants (container inits), once per process."""
    global _subreaper_set
    if _subreaper_set:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return
    _subreaper_set = True


class RuncRuntime:
    """``ContainerRuntime`` backed by runc, overlayfs, cgroups and bridge networking."""

    def __init__(
        self,
        *,
        state_dir: Path,
        cgroup_parent: str,
        bridge: str = "berth0",
        subnet: str,
        nft_table: str,
        insecure_registries: Sequence[str] = (),
        runc_binary: str = "runc",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.runc_root = self.state_dir / "runc"
        self.containers_dir = self.state_dir / "containers"
        for d in (self.state_dir, self.runc_root, self.containers_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.runc_binary = runc_binary
        self.images = ImageStore(self.state_dir, insecure_registries=insecure_registries)
        self.cgroups = Cgroups(cgroup_parent)
        self.network = HostNetwork(
            state_dir=self.state_dir, bridge=bridge, subnet=subnet, nft_table=nft_table
        )
        self._exits: dict[tuple[str, int], asyncio.Future[ExitStatus]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        become_subreaper()

    # -- helpers ---------------------------------------------------------------------------
    def bundle(self, task_id: str) -> Path:
        if not _TASK_ID.match(task_id):
            raise ContainerError(f"invalid task id {task_id!r}")
        return self.containers_dir / task_id

    def _lock(self, task_id: str) -> asyncio.Lock:
        return self._locks.setdefault(task_id, asyncio.Lock())

    async def _runc(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        argv = [self.runc_binary, "--root", str(self.runc_root), *args]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        rc = proc.returncode or 0
        text = err.decode(errors="replace")
        if rc != 0 and check:
            raise ContainerError(f"runc {args[0]} failed: {_runc_error(text)}")
        return rc, out.decode(errors="replace"), text

    async def _state(self, task_id: str) -> dict[str, Any] | None:
        rc, out, _ = await self._runc("state", task_id, check=False)
        if rc != 0:
            return None
        with contextlib.suppress(ValueError):
            state: dict[str, Any] = json.loads(out)
            return state
        return None

    # -- ContainerRuntime ------------------------------------------------------------------
    async def pull(self, reference: str) -> ImageInfo:
        return await self.images.pull(reference)

    async def create(self, spec: ContainerSpec, image: ImageInfo) -> None:
        bundle = self.bundle(spec.task_id)
        async with self._lock(spec.task_id):
            bundle.mkdir(parents=True, exist_ok=True)
            try:
                rootfs = await asyncio.to_thread(overlay.mount_overlay, Path(image.rootfs), bundle)
                ip, netns_path = "", ""
                if spec.network == "bridge":
                    net = await self.network.attach(spec.task_id, spec.ports)
                    ip, netns_path = net.ip, net.netns_path
                hostname = _short(spec.task_id)
                (bundle / "hosts").write_text(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    + (f"{ip}\t{hostname}\n" if ip else f"127.0.1.1\t{hostname}\n")
                )
                resolv = _resolv_conf(host_network=spec.network == "host")
                if resolv is not None:
                    (bundle / "resolv.conf").write_text(resolv)
                config = build_config(
                    spec,
                    image,
                    rootfs=rootfs,
                    hostname=hostname,
                    netns_path=netns_path,
                    cgroups_path=self.cgroups.cgroups_path(spec.task_id),
                    hosts_file=bundle / "hosts",
                    resolv_file=bundle / "resolv.conf" if resolv is not None else None,
                )
                _write_json(bundle / "config.json", config)
                _write_json(
                    bundle / "berth.json",
                    {
                        "spec": _spec_to_json(spec),
                        "image_digest": image.digest,
                        "ip": ip,
                        "image": asdict(image),
                    },
                )
            except BaseException:
                await self._teardown(spec.task_id)
                raise

    async def start(self, task_id: str) -> RunningContainer:
        bundle = self.bundle(task_id)
        async with self._lock(task_id):
            saved = _read_json(bundle / "berth.json")
            if saved is None or not (bundle / "config.json").exists():
                raise ContainerError(f"container {task_id} was not created")
            state = await self._state(task_id)
            if state is not None and state.get("status") == "running":
                raise ContainerError(f"container {task_id} is already running")
            await self._ensure_prepared(task_id, saved)
            if state is not None:
                await self._runc("delete", "--force", task_id, check=False)
                await asyncio.to_thread(self.cgroups.remove, task_id)  # fresh OOM counters
            pidfile = bundle / "pid"
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()
            started_at = time.time()
            run = asyncio.ensure_future(self._runc_run(task_id, bundle, pidfile))
            try:
                rc = await asyncio.shield(run)
            except asyncio.CancelledError:
                # cancelled (the task is being stopped) while runc is started or makes the
                # container: let it finish (within reason), still holding the lock, and record
                # what it made, so that the stop that follows (it waits for the lock) finds a
                # container it can kill, rather than racing runc's own create with the teardown
                # (a container that got past its setup as its bundle went would run on unseen:
                # an at-most-one service twice). Shielded from the start: a cancelled spawn
                # kills runc wherever it was in making the container.
                try:
                    await asyncio.wait({run}, timeout=RUNC_RUN_GRACE)
                finally:
                    if not run.done():  # runc hung past the grace (or a second cancel): nobody awaits it
                        run.add_done_callback(_consume_outcome)
                if run.done() and not run.cancelled() and run.exception() is None and run.result() == 0:
                    with contextlib.suppress(OSError, ValueError):
                        self._started(task_id, int(pidfile.read_text().strip()), started_at)
                raise
            if rc != 0:
                reason = _runc_log_error(bundle / "runc.log") or f"runc run exited with {rc}"
                await self._runc("delete", "--force", task_id, check=False)
                raise ContainerError(f"container failed to start: {reason}")
            pid = int(pidfile.read_text().strip())
            self._started(task_id, pid, started_at)
            return RunningContainer(
                task_id=task_id, pid=pid, ip=str(saved.get("ip", "")),
                image_digest=str(saved.get("image_digest", "")), started_at=started_at,
            )  # fmt: skip

    async def _runc_run(self, task_id: str, bundle: Path, pidfile: Path) -> int:
        """``runc run --detach``, output to the container's log: its exit code."""
        with open(bundle / "stdout.log", "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                self.runc_binary, "--root", str(self.runc_root),
                "--log", str(bundle / "runc.log"), "--log-format", "json",
                "run", "--detach", "--pid-file", str(pidfile), "--bundle", str(bundle), task_id,
                stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
            )  # fmt: skip
        return await proc.wait()

    def _started(self, task_id: str, pid: int, started_at: float) -> None:
        _write_json(self.bundle(task_id) / "run.json", {"pid": pid, "started_at": started_at})
        self._watch(task_id, pid)  # a pidfd now, before the pid could be recycled

    async def wait(self, task_id: str) -> ExitStatus:
        pid = await self._current_pid(task_id)
        if pid is None:
            return ExitStatus(exit_code=None, oom_killed=self.cgroups.oom_kills(task_id) > 0)
        return await asyncio.shield(self._watch(task_id, pid))

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        busy = self._locks.get(task_id)
        if busy is not None and busy.locked():
            # a create or start under way first: a start being cancelled lets `runc run` finish
            # and records what it made, which this stop is then to kill
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RUNC_RUN_GRACE), busy:
                    pass
        pid = await self._current_pid(task_id)
        if pid is None:
            return
        exited = self._watch(task_id, pid)
        if timeout > 0:
            await self._runc("kill", task_id, "TERM", check=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), timeout)
        if not exited.done():
            await self._runc("kill", "--all", task_id, "KILL", check=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), 10.0)
        if not exited.done():
            raise ContainerError(f"container {task_id} did not die after SIGKILL")

    async def remove(self, task_id: str) -> None:
        self.bundle(task_id)  # validates the id
        await self.stop(task_id, timeout=0)
        async with self._lock(task_id):
            await self._teardown(task_id)

    async def list(self) -> list[ContainerRecord]:
        records: list[ContainerRecord] = []
        for bundle in sorted(self.containers_dir.iterdir()):
            saved = _read_json(bundle / "berth.json")
            if saved is None:
                continue
            try:
                spec = _spec_from_json(saved["spec"])
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignoring unreadable %s: %s", bundle / "berth.json", e)
                continue
            ip, digest = str(saved.get("ip", "")), str(saved.get("image_digest", ""))
            running = None
            state = await self._state(spec.task_id)
            if state is not None and state.get("status") == "running" and state.get("pid"):
                run = _read_json(bundle / "run.json") or {}
                pid = int(state["pid"])
                started = float(run["started_at"]) if run.get("pid") == pid else time.time()
                running = RunningContainer(
                    task_id=spec.task_id, pid=pid, ip=ip, image_digest=digest, started_at=started
                )
            records.append(ContainerRecord(spec=spec, image_digest=digest, ip=ip, running=running))
        return records

    # -- extras (not part of the protocol) ---------------------------------------------------
    def log_path(self, task_id: str) -> Path:
        """The container's combined stdout/stderr file."""
        return self.bundle(task_id) / "stdout.log"

    async def setup_host(self) -> None:
        """Prepare the bridge and NAT table now (``create`` does it lazily otherwise)."""
        await self.network.setup_host()

    async def teardown_host(self) -> None:
        """Remove bridge, nft table and the cgroup parent (``berth dev down``, tests)."""
        await self.network.teardown_host()
        self.cgroups.remove_parent_if_empty()

    # -- internals -------------------------------------------------------------------------
    async def _current_pid(self, task_id: str) -> int | None:
        state = await self._state(task_id)
        if state is None or state.get("status") not in ("running", "paused", "created"):
            # stopped: the process may be a zombie child of ours still to be reaped
            run = _read_json(self.bundle(task_id) / "run.json")
            if run and (task_id, int(run["pid"])) in self._exits:
                return int(run["pid"])
            return None
        pid = state.get("pid")
        return int(pid) if pid else None

    def _watch(self, task_id: str, pid: int) -> asyncio.Future[ExitStatus]:
        """A future resolved with the exit status of ``pid`` (one pidfd reader per process)."""
        key = (task_id, pid)
        fut = self._exits.get(key)
        if fut is not None:
            return fut
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._exits[key] = fut

        def finish(fd: int | None) -> None:
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)
            if not fut.done():
                fut.set_result(self._reap(task_id, pid))

        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            finish(None)
            return fut
        loop.add_reader(fd, finish, fd)
        return fut

    def _reap(self, task_id: str, pid: int) -> ExitStatus:
        code: int | None = None
        sig: int | None = None
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                if os.WIFSIGNALED(status):
                    sig = os.WTERMSIG(status)
                    code = 128 + sig
                elif os.WIFEXITED(status):
                    code = os.WEXITSTATUS(status)
        except ChildProcessError:
            pass  # not our child (re-adopted after an agent restart)
        oom = self.cgroups.oom_kills(task_id) > 0
        log.debug("container %s pid %d exited: code=%s signal=%s oom=%s", task_id, pid, code, sig, oom)
        return ExitStatus(exit_code=code, oom_killed=oom, signal=sig)

    async def _ensure_prepared(self, task_id: str, saved: dict[str, Any]) -> None:
        """Re-make what a host reboot loses (overlay mount, netns in /run) before a (re)start."""
        bundle = self.bundle(task_id)
        image = saved.get("image") or {}
        if not overlay.is_mounted(bundle / "rootfs") and image.get("rootfs"):
            await asyncio.to_thread(overlay.mount_overlay, Path(image["rootfs"]), bundle)
        spec = _spec_from_json(saved["spec"])
        if spec.network == "bridge" and not Path(self.network.netns_path(task_id)).exists():
            net = await self.network.attach(task_id, spec.ports)
            if net.ip != saved.get("ip"):
                raise ContainerError(f"container {task_id} lost its address {saved.get('ip')}; recreate it")

    async def _teardown(self, task_id: str) -> None:
        """Remove every piece of a container; tolerant of anything already gone."""
        bundle = self.bundle(task_id)
        await self._runc("delete", "--force", task_id, check=False)
        for key in [k for k in self._exits if k[0] == task_id]:
            fut = self._exits.pop(key)
            if not fut.done():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(key[1], os.WNOHANG)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(overlay.unmount, bundle / "rootfs")
        await self.network.detach(task_id)
        await asyncio.to_thread(self.cgroups.remove, task_id)
        if bundle.exists():
            await asyncio.to_thread(shutil.rmtree, bundle, True)
        shutil.rmtree(self.runc_root / task_id, ignore_errors=True)
        self._locks.pop(task_id, None)


# -- config.json ---------------------------------------------------------------------------------


def _consume_outcome(future: asyncio.Future[int]) -> None:
    """Read a finished future's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _short(task_id: str) -> str:
    return task_id[:12]


def build_config(
    spec: ContainerSpec,
    image: ImageInfo,
    *,
    rootfs: Path,
    hostname: str,
    netns_path: str,
    cgroups_path: str,
    hosts_file: Path,
    resolv_file: Path | None,
) -> dict[str, Any]:
    """The OCI runtime config: ``runc spec`` defaults merged with the image and the service spec."""
    args = list(image.entrypoint) + list(spec.args or image.cmd)
    if not args:
        raise ContainerError("image has no entrypoint or command and the service gives no args")
    env = _merge_env(
        image.env,
        spec.env,
        {
            "BERTH_TASK_ID": spec.task_id,
            "BERTH_SERVICE": spec.service,
            "BERTH_SLOT": str(spec.slot),
            "BERTH_NODE_NAME": spec.node_name,
            "HOSTNAME": hostname,
        },
    )
    uid, gid = resolve_user(image.user, rootfs)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.cpu_millis > 0:
        resources["cpu"] = {
            "quota": spec.cpu_millis * 100,
            "period": 100000,
            "shares": max(2, spec.cpu_millis * 1024 // 1000),
        }
    if spec.memory_bytes > 0:
        resources["memory"] = {"limit": spec.memory_bytes, "swap": spec.memory_bytes}
    if spec.pids_limit > 0:
        resources["pids"] = {"limit": spec.pids_limit}
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if spec.network == "bridge":
        namespaces.append({"type": "network", "path": netns_path})
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts_file), "options": ["rbind", "ro"]},
    ]  # fmt: skip
    if resolv_file is not None:
        mounts.append(
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": str(resolv_file),
                "options": ["rbind", "ro"],
            }
        )
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": image.workdir or "/",
            "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted")},
            # runc spec's default: lowering works here, raising rlimits is refused on this kind of host
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }  # fmt: skip


def _merge_env(image_env: Sequence[str], spec_env: Mapping[str, str], berth: Mapping[str, str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in image_env:
        k, _, v = item.partition("=")
        merged[k] = v
    merged.update(spec_env)
    merged.update(berth)
    merged.setdefault("PATH", _DEFAULT_PATH.split("=", 1)[1])
    return [f"{k}={v}" for k, v in merged.items()]


def resolve_user(user: str, rootfs: Path) -> tuple[int, int]:
    """uid/gid for an image ``User`` ("", "uid", "uid:gid", "name", "name:group")."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    passwd = _read_db(rootfs / "etc" / "passwd")
    uid: int | None = None
    gid: int | None = None
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in passwd if len(e) > 3 and e[2] == name), None)
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    else:
        entry = next((e for e in passwd if e and e[0] == name), None)
        if entry is None or len(entry) < 4:
            raise ContainerError(f"user {name!r} not found in the image's /etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((e for e in _read_db(rootfs / "etc" / "group") if e and e[0] == group), None)
            if g is None or len(g) < 3:
                raise ContainerError(f"group {group!r} not found in the image's /etc/group")
            gid = int(g[2])
    return uid, gid


def _read_db(path: Path) -> list[list[str]]:
    try:
        # the rootfs is image content: never follow a symlink out of it
        if path.is_symlink():
            return []
        return [line.split(":") for line in path.read_text(errors="replace").splitlines() if line]
    except OSError:
        return []


def _resolv_conf(*, host_network: bool) -> str | None:
    """The host's resolv.conf without loopback resolvers (unreachable from a container netns)."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return None
    if host_network:
        return text
    lines = [
        ln for ln in text.splitlines()
        if not (ln.split()[:1] == ["nameserver"] and (ln.split()[1:2] or [""])[0].startswith(("127.", "::1")))
    ]  # fmt: skip
    if not any(ln.startswith("nameserver") for ln in lines):
        return None
    return "\n".join(lines) + "\n"


# -- persistence ---------------------------------------------------------------------------------


def _spec_to_json(spec: ContainerSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["env"] = dict(spec.env)
    d["args"] = list(spec.args)
    d["ports"] = [asdict(p) for p in spec.ports]
    return d


def _spec_from_json(d: dict[str, Any]) -> ContainerSpec:
    return ContainerSpec(
        task_id=str(d["task_id"]),
        service=str(d["service"]),
        slot=int(d["slot"]),
        node_name=str(d["node_name"]),
        image=str(d["image"]),
        args=tuple(str(a) for a in d.get("args", ())),
        env={str(k): str(v) for k, v in dict(d.get("env", {})).items()},
        cpu_millis=int(d.get("cpu_millis", 0)),
        memory_bytes=int(d.get("memory_bytes", 0)),
        pids_limit=int(d.get("pids_limit", 512)),
        network="host" if d.get("network") == "host" else "bridge",
        ports=tuple(
            PortBinding(
                container_port=int(p["container_port"]),
                host_port=int(p["host_port"]),
                protocol="udp" if p.get("protocol") == "udp" else "tcp",
            )
            for p in d.get("ports", ())
        ),
        # a bundle saved before this field: not known, so treated as at-most-one (stopped when the
        # agent is cut off) rather than risk a second copy
        at_most_one=bool(d.get("at_most_one", True)),
    )


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _runc_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    last = lines[-1]
    with contextlib.suppress(ValueError):
        obj = json.loads(last)
        if isinstance(obj, dict) and "msg" in obj:
            return str(obj["msg"])[:300]
    if "msg=" in last:
        last = last.split("msg=", 1)[1].strip().strip('"')
    return last[:300]


def _runc_log_error(path: Path) -> str | None:
    """The last error runc logged (``--log-format json``), cleaned up for ``berth service ps``."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("level") in ("error", "fatal"):
                msg = str(obj.get("msg", ""))
                return msg.removeprefix("runc run failed: ")[:300]
    return None
