"""A multi-host Berth cluster on one machine, for development and integration tests.

A "host" is a network namespace joined to a bridge in the root namespace by a veth pair; it runs
its own agent with its own state dir, cgroup parent and container subnet. etcd, an OCI registry and
the controller run in the root namespace. ``berth dev up|status|down`` and the integration tests
both drive this module; it never imports the controller or the agent (they run as ``python -m``).

Address plan for cluster ``subnet_index`` k (0..9), host i (1-based)::

    bridge  bb-<name>             10.(210+k).0.1/24    registry :registry_port, controller :controller_port
    host i  netns berth-<name>-hi 10.(210+k).0.(10+i)/24, default route via the bridge IP
    host i  container subnet      10.(220+k).i.0/24    (routed from the root namespace to the host)
    etcd                           127.0.0.1:etcd_port (clients), etcd_port+1 (peer); root namespace only

Everything a cluster creates carries its name: processes carry ``BERTH_DEV_CLUSTER=<name>`` in their
environment, links an ``ifalias`` of ``berth-dev/<name>/...``, netns and cgroup parents the prefix
``berth-<name>-``, the root nftables table is ``berth_dev_<name>``, files live in ``<base_dir>/<name>``.
``down()`` and ``sweep()`` find leftovers by those marks, so they also work without ``state.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from berth.cli.portal_image import ImageBuildError, build_portal_image

ENV_MARK = "BERTH_DEV_CLUSTER"
LINK_ALIAS = "berth-dev"
NETNS_DIR = Path("/run/netns")
DEFAULT_BASE_DIR = Path("/var/tmp/berth-dev")
DEV_SCRAPE_INTERVAL = "1s"
DEPLOY_PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
AGENT_BRIDGE = "berth0"

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_MAX_HOST_INDEX = 200

Progress = Callable[[str], None]


class DevClusterError(RuntimeError):
    """A dev cluster operation failed; the message is meant for a person (no traceback needed)."""


class PreflightError(DevClusterError):
    """``up()`` refused to start (not root, tools missing, already up, ports taken): nothing was built."""


# --------------------------------------------------------------------------------------------------
# configuration and state


@dataclass(frozen=True, slots=True, kw_only=True)
class DevClusterConfig:
    name: str = "dev"
    hosts: int = 3
    base_dir: Path = DEFAULT_BASE_DIR
    host_cpus: str | None = None
    host_memory: str | None = None
    etcd_port: int = 2379
    registry_port: int = 5000
    controller_port: int = 7070
    metrics_port: int = 0  # the controller's /metrics and /sd; 0 = controller_port + 1
    monitoring: bool = False  # also run Prometheus, scraping the cluster through /sd
    prometheus_port: int = 9090
    subnet_index: int = 0
    start_controller: bool = True
    start_agents: bool = True
    build_image: bool = True
    python: str = sys.executable
    ready_timeout: float = 30.0
    controller_args: tuple[str, ...] = ()
    agent_args: tuple[str, ...] = ()

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise DevClusterError(
                f"bad cluster name {self.name!r}: 1-12 lowercase letters and digits, starting with a letter"
            )
        if not 0 <= self.hosts <= _MAX_HOST_INDEX:
            raise DevClusterError(f"--hosts must be between 0 and {_MAX_HOST_INDEX}")
        if not 0 <= self.subnet_index <= 9:
            raise DevClusterError("subnet_index must be between 0 and 9")
        for what, port in (
            ("etcd", self.etcd_port),
            ("registry", self.registry_port),
            ("controller", self.controller_port),
            ("metrics", self.controller_metrics_port),
            *([("prometheus", self.prometheus_port)] if self.monitoring else []),
        ):
            if not 1 <= port <= 65535:
                raise DevClusterError(f"bad {what} port {port}")
        ports = self.ports()
        if len(set(ports)) != len(ports):
            raise DevClusterError(
                f"ports overlap: etcd {self.etcd_port}(+1), registry {self.registry_port}, "
                f"controller {self.controller_port}, metrics {self.controller_metrics_port}"
                + (f", prometheus {self.prometheus_port}" if self.monitoring else "")
            )

    @property
    def controller_metrics_port(self) -> int:
        return self.metrics_port or self.controller_port + 1

    def ports(self) -> list[int]:
        """Every root-namespace port the cluster listens on."""
        ports = [
            self.etcd_port,
            self.etcd_port + 1,
            self.registry_port,
            self.controller_port,
            self.controller_metrics_port,
        ]
        return [*ports, self.prometheus_port] if self.monitoring else ports

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_dir"] = str(self.base_dir)
        d["controller_args"] = list(self.controller_args)
        d["agent_args"] = list(self.agent_args)
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> DevClusterConfig:
        known = {f for f in DevClusterConfig.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["base_dir"] = Path(kw.get("base_dir", DEFAULT_BASE_DIR))
        kw["controller_args"] = tuple(kw.get("controller_args", ()))
        kw["agent_args"] = tuple(kw.get("agent_args", ()))
        return DevClusterConfig(**kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInfo:
    name: str  # node name given to the agent (--name), e.g. "h1"
    index: int  # i: picks the address 10.(210+k).0.(10+i) and the subnet 10.(220+k).i.0/24
    netns: str  # berth-<cluster>-<name>
    address: str  # the host's IP on the cluster bridge
    subnet: str  # its container subnet
    veth: str  # root-namespace end of its veth pair (eth0 inside)
    state_dir: str
    cgroup_parent: str  # berth-<cluster>-<name>
    nft_table: str  # the agent's table, inside the host namespace
    cpus: str | None = None
    memory: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> HostInfo:
        return HostInfo(**{**d, "labels": dict(d.get("labels") or {})})


@dataclass(slots=True, kw_only=True)
class ProcessInfo:
    name: str
    pid: int
    argv: list[str]
    log: str
    address: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ProcessInfo:
        return ProcessInfo(
            name=d["name"],
            pid=int(d["pid"]),
            argv=list(d.get("argv", [])),
            log=d.get("log", ""),
            address=d.get("address", ""),
        )


# --------------------------------------------------------------------------------------------------
# small helpers


def _run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), check=False, capture_output=True, text=True, input=input, timeout=timeout
        )
    except FileNotFoundError as e:
        raise DevClusterError(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise DevClusterError(f"{' '.join(argv)} timed out after {timeout:.0f}s") from e
    if check and done.returncode != 0:
        raise DevClusterError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done


def _link_name(prefix: str, *parts: str) -> str:
    """``prefix`` + ``parts`` joined by '-', hashed when longer than the kernel's 15 characters."""
    name = prefix + "-".join(parts)
    if len(name) <= 15:
        return name
    return prefix + hashlib.sha1("/".join(parts).encode()).hexdigest()[: 15 - len(prefix)]


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _no_proxy_opener().open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def owner_alive(name: str, prefix: str) -> bool:
    """Whether the process whose pid follows ``prefix`` in a cluster name (``dt1234a``) still runs:
    tests and benches name clusters so, and sweep only the leftovers of dead runs."""
    match = re.match(rf"{re.escape(prefix)}(\d+)", name)
    if match is None:
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port_pairs(n: int, low: int, high: int) -> list[int]:
    """``n`` free ports in ``[low, high)``, each with its successor free too (etcd takes port and
    port+1), for clusters that must not collide with others on this machine (tests, benches)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    while len(chosen) < n:
        p = rng.randrange(low, high, 2)
        if p not in chosen and _port_free(p) and _port_free(p + 1):
            chosen.append(p)
    return chosen


def free_subnet_index(order: Iterable[int] = range(1, 10)) -> int | None:
    """The first subnet index (1-9) whose host and container ranges are not routed here."""
    routes = _run(["ip", "-4", "route", "show"]).stdout.splitlines()
    for k in order:
        if not any(line.startswith((f"10.{210 + k}.", f"10.{220 + k}.")) for line in routes):
            return k
    return None


def _tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


def _proc_environ_has(pid: int, marker: bytes) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(item.startswith(marker) for item in env.split(b"\0"))


def _pid_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc/<pid>/stat, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _marked_pids(name: str, *, prefix: bool = False) -> dict[int, str]:
    """Live processes whose environment carries ``BERTH_DEV_CLUSTER=<name>`` (or a name starting with it)."""
    want = f"{ENV_MARK}={name}".encode()
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(want) and (prefix or item == want):
                state = _pid_state(int(entry))
                if state is not None and state not in "ZX":
                    found[int(entry)] = item.split(b"=", 1)[1].decode(errors="replace")
                break
    return found


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` runs (gone or zombie); returns those still running."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left:
        for pid in list(left):
            # a zombie counts as gone; never waitpid() here: that would steal the status of someone's Popen
            state = _pid_state(pid)
            if state is None or state in "ZX":
                left.discard(pid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return left


def _running(pid: int) -> bool:
    state = _pid_state(pid)
    return state is not None and state not in "ZX"


def _parents() -> dict[int, int]:
    """pid -> ppid of every process (from /proc/<pid>/stat)."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(roots: Iterable[int]) -> set[int]:
    """Every live descendant of ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _self_and_ancestors() -> set[int]:
    parents = _parents()
    chain = {os.getpid()}
    pid = os.getpid()
    while pid in parents and parents[pid] > 1 and parents[pid] not in chain:
        pid = parents[pid]
        chain.add(pid)
    return chain | {1}


def _netns_pids(ns_path: Path) -> set[int]:
    """Processes whose network namespace is the one bound at ``ns_path``."""
    try:
        st = os.stat(ns_path)
    except OSError:
        return set()
    want = (st.st_dev, st.st_ino)
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == want:
            found.add(int(entry))
    return found


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of the current mount namespace, in mount order."""
    out: list[tuple[str, str]] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((_unescape_mount(parts[1]), parts[2]))
    return out


def _cgroup_roots() -> list[Path]:
    roots: list[Path] = []
    for mnt, fstype in _mounts():
        if fstype in ("cgroup", "cgroup2") and Path(mnt) not in roots:
            roots.append(Path(mnt))
    return roots


def _find_cgroups(name_prefix: str) -> list[Path]:
    """Cgroup directories, in every hierarchy and at any depth, whose name starts with ``name_prefix``."""
    found: list[Path] = []
    for root in _cgroup_roots():
        for dirpath, dirnames, _ in os.walk(root):
            keep: list[str] = []
            for d in dirnames:
                if d.startswith(name_prefix):
                    found.append(Path(dirpath) / d)
                else:
                    keep.append(d)
            dirnames[:] = keep
    return found


def _cgroup_tree_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, _ in os.walk(top):
        with contextlib.suppress(OSError):
            for line in (Path(dirpath) / "cgroup.procs").read_text().split():
                pids.add(int(line))
    return pids


def _thaw(top: Path) -> None:
    """A frozen (freezer v1 / cgroup.freeze v2) cgroup would swallow SIGKILL: thaw it first."""
    for dirpath, _, files in os.walk(top):
        if "freezer.state" in files:
            with contextlib.suppress(OSError):
                (Path(dirpath) / "freezer.state").write_text("THAWED")
        if "cgroup.freeze" in files:
            with contextlib.suppress(OSError):
                (Path(dirpath) / "cgroup.freeze").write_text("0")


def _kill_cgroups(dirs: Sequence[Path], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for d in dirs:
            _thaw(d)
            pids |= _cgroup_tree_pids(d)
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        _wait_gone(pids, 1.0)


def _rmdir_cgroups(dirs: Sequence[Path], timeout: float = 5.0) -> list[Path]:
    """rmdir each tree deepest first; returns what could not be removed."""
    deadline = time.monotonic() + timeout
    left = list(dirs)
    while left:
        still: list[Path] = []
        for top in left:
            for dirpath, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # EBUSY right after the last process died: retried below
            if top.exists():
                still.append(top)
        left = still
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return left


def _links() -> list[dict[str, Any]]:
    out = _run(["ip", "-j", "-d", "link", "show"], check=False).stdout
    try:
        data = json.loads(out or "[]")
    except json.JSONDecodeError:
        return []
    return [d for d in data if isinstance(d, dict)]


def _nft_tables() -> list[tuple[str, str]]:
    out = _run(["nft", "list", "tables"], check=False).stdout
    tables: list[tuple[str, str]] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            tables.append((parts[1], parts[2]))
    return tables


def _netns_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _delete_netns(ns: str) -> None:
    if _run(["ip", "netns", "delete", ns], check=False).returncode == 0:
        return
    path = NETNS_DIR / ns
    _run(["umount", "-l", str(path)], check=False)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _unmount_under(prefixes: Sequence[str], rounds: int = 4) -> list[str]:
    """Unmount every mount at or below one of ``prefixes`` (deepest, newest first); returns what is left."""

    def below() -> list[tuple[int, int, str]]:
        return [
            (mnt.count("/"), i, mnt)
            for i, (mnt, _) in enumerate(_mounts())
            if any(mnt == p or mnt.startswith(p.rstrip("/") + "/") for p in prefixes)
        ]

    for _ in range(rounds):
        targets = below()
        if not targets:
            return []
        for _, _, mnt in sorted(targets, reverse=True):
            if _run(["umount", mnt], check=False).returncode != 0:
                _run(["umount", "-l", mnt], check=False)
    return [mnt for _, _, mnt in below()]


def _runc_roots(state_dir: Path) -> list[Path]:
    """runc state roots an agent may have used under its state dir (``<state>/runc`` or any ``runc`` dir)."""
    roots: list[Path] = []
    if not state_dir.is_dir():
        return roots
    base_depth = len(state_dir.parts)
    for dirpath, dirnames, _ in os.walk(state_dir):
        p = Path(dirpath)
        if len(p.parts) - base_depth >= 3:
            dirnames[:] = []
        if p.name == "runc":
            roots.append(p)
            dirnames[:] = []
    return roots


def _delete_runc_containers(state_dir: Path) -> None:
    if shutil.which("runc") is None:
        return
    for root in _runc_roots(state_dir):
        listing = _run(["runc", "--root", str(root), "list", "-q"], check=False, timeout=20)
        for cid in listing.stdout.split():
            _run(["runc", "--root", str(root), "delete", "--force", cid], check=False, timeout=20)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------
# teardown by name (used by down() and sweep())


def _cluster_netns(ns: str, name: str) -> bool:
    """The hosts' netns ``berth-<name>-<host>``, and the agents' container netns: the agent names those
    ``<its nft table>-<hash>``, and a dev host's table is ``berth_<name>_<host>``."""
    return ns.startswith((f"berth-{name}-", f"berth_{name}_"))


def _teardown(name: str, base_dir: Path, state: Mapping[str, Any] | None) -> list[str]:
    """Remove every trace of cluster ``name``; returns problems that remained (empty when clean)."""
    cluster_dir = base_dir / name
    ns_prefix = f"berth-{name}-"
    hosts = [HostInfo.from_json(h) for h in (state or {}).get("hosts", {}).values()]
    procs = {k: ProcessInfo.from_json(v) for k, v in (state or {}).get("processes", {}).items()}
    marker = f"{ENV_MARK}={name}".encode()

    def recorded(keys: Iterable[str]) -> list[int]:
        return [p.pid for k, p in procs.items() if k in keys and _proc_environ_has(p.pid, marker)]

    # 1. agents: SIGTERM, then SIGKILL
    agent_keys = [k for k in procs if k.startswith("agent-")]
    agent_pids = recorded(agent_keys)
    for pid in agent_pids:
        _kill(pid, signal.SIGTERM)
    for pid in _wait_gone(agent_pids, 5.0):
        _kill(pid, signal.SIGKILL)
    _wait_gone(agent_pids, 5.0)

    # 2. containers the agents left: runc state, then every process in the hosts' cgroup parents
    host_dirs = {Path(h.state_dir) for h in hosts}
    if (cluster_dir / "hosts").is_dir():
        host_dirs |= {p for p in (cluster_dir / "hosts").iterdir() if p.is_dir()}
    for d in sorted(host_dirs):
        _delete_runc_containers(d)
    cgroups = _find_cgroups(ns_prefix)
    _kill_cgroups(cgroups)

    # 3. the root-namespace services, then anything else still carrying the cluster's mark
    for keys in (["prometheus"], ["controller"], ["registry"], ["etcd"]):
        pids = recorded(keys)
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        for pid in _wait_gone(pids, 5.0):
            _kill(pid, signal.SIGKILL)
        _wait_gone(pids, 3.0)
    for _ in range(3):
        stray = _marked_pids(name)
        if not stray:
            break
        for pid in stray:
            _kill(pid, signal.SIGKILL)
        _wait_gone(stray, 3.0)
    _kill_cgroups(_find_cgroups(ns_prefix))

    # 4. mounts under the state dir and the hosts' netns
    problems: list[str] = []
    left_mounts = _unmount_under([str(cluster_dir)])
    problems += [f"mount {m}" for m in left_mounts]

    # 5. links (the bridge, veths; deleting one end of a veth deletes its peer), netns, routes go with links
    alias_prefix = f"{LINK_ALIAS}/{name}/"
    known = {f"bb-{name}"} | {h.veth for h in hosts}
    for link in _links():
        ifname = str(link.get("ifname", ""))
        if ifname in known or str(link.get("ifalias", "")).startswith(alias_prefix):
            _run(["ip", "link", "delete", ifname], check=False)
    for ns in _netns_names():
        if _cluster_netns(ns, name):
            _delete_netns(ns)

    # 6. nftables: the cluster's table, and agent tables should one have been made in the root namespace
    tables = {f"berth_dev_{name}"} | {h.nft_table for h in hosts}
    for family, table in _nft_tables():
        if table in tables:
            _run(["nft", "delete", "table", family, table], check=False)

    # 7. cgroups, deepest first
    left_cgroups = _rmdir_cgroups(_find_cgroups(ns_prefix))
    problems += [f"cgroup {c}" for c in left_cgroups]

    # 8. files
    if cluster_dir.exists():
        if left_mounts:
            problems.append(f"kept {cluster_dir}: mounts remain below it")
        else:
            shutil.rmtree(cluster_dir, ignore_errors=True)
            if cluster_dir.exists():
                problems.append(f"dir {cluster_dir}")
    with contextlib.suppress(OSError):
        base_dir.rmdir()  # only when empty

    # net.ipv4.ip_forward stays on: it is machine-wide, and other clusters or tests may rely on it.

    for ns in _netns_names():
        if _cluster_netns(ns, name):
            problems.append(f"netns {ns}")
    for link in _links():
        if str(link.get("ifname", "")) in known or str(link.get("ifalias", "")).startswith(alias_prefix):
            problems.append(f"link {link.get('ifname')}")
    problems += [f"process {pid}" for pid in _marked_pids(name)]
    return problems


# --------------------------------------------------------------------------------------------------
# the cluster


class DevCluster:
    """One dev cluster. State lives in ``<base_dir>/<name>/state.json``; a new object for the same name and
    base dir picks it up (and the config the cluster was brought up with), so the CLI's ``status`` and
    ``down`` work from any process."""

    def __init__(self, config: DevClusterConfig) -> None:
        config.validate()
        self.config = config
        self._popen: dict[str, subprocess.Popen[bytes]] = {}
        self._state: dict[str, Any] = {}
        loaded = _read_state(self.state_file)
        if loaded is not None:
            self._state = loaded
            with contextlib.suppress(Exception):
                stored = DevClusterConfig.from_json(loaded.get("config", {}))
                self.config = replace(stored, name=config.name, base_dir=config.base_dir)

    # ---- addresses and paths

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def cluster_dir(self) -> Path:
        return self.config.base_dir / self.config.name

    @property
    def state_file(self) -> Path:
        return self.cluster_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.cluster_dir / "logs"

    @property
    def bridge(self) -> str:
        return f"bb-{self.config.name}"

    @property
    def bridge_ip(self) -> str:
        return f"10.{210 + self.config.subnet_index}.0.1"

    @property
    def nft_table(self) -> str:
        return f"berth_dev_{self.config.name}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.config.etcd_port}"

    @property
    def controller_address(self) -> str:
        return f"127.0.0.1:{self.config.controller_port}"

    @property
    def metrics_address(self) -> str:
        """The controller's /metrics and /sd (Prometheus HTTP service discovery)."""
        return f"127.0.0.1:{self.config.controller_metrics_port}"

    @property
    def prometheus_url(self) -> str | None:
        return f"http://127.0.0.1:{self.config.prometheus_port}" if self.config.monitoring else None

    @property
    def registry_address(self) -> str:
        return f"{self.bridge_ip}:{self.config.registry_port}"

    @property
    def image(self) -> str | None:
        """The pushed portal image reference, once ``up()`` built it."""
        ref = self._state.get("image")
        return str(ref) if ref else None

    @property
    def hosts(self) -> dict[str, HostInfo]:
        return {k: HostInfo.from_json(v) for k, v in self._state.get("hosts", {}).items()}

    def host(self, host: str) -> HostInfo:
        try:
            return self.hosts[host]
        except KeyError:
            raise DevClusterError(f"no host {host!r} in cluster {self.name!r}") from None

    def host_address(self, host: str) -> str:
        return self.host(host).address

    def netns(self, host: str) -> str:
        return self.host(host).netns

    def netns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.netns(host))

    def is_up(self) -> bool:
        return self.state_file.exists()

    # ---- state

    def _save(self) -> None:
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    def _procs(self) -> dict[str, ProcessInfo]:
        return {k: ProcessInfo.from_json(v) for k, v in self._state.get("processes", {}).items()}

    def _alive(self, key: str) -> bool:
        p = self._popen.get(key)
        info = self._procs().get(key)
        if info is None:
            return False
        if p is not None and p.pid == info.pid:
            return p.poll() is None
        state = _pid_state(info.pid)
        return (
            state is not None
            and state not in "ZX"
            and _proc_environ_has(info.pid, f"{ENV_MARK}={self.name}".encode())
        )

    # ---- up

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise PreflightError("not root: berth dev needs root to create network namespaces")
        tools = ["ip", "nft", "nsenter", "etcd", "docker-registry"]
        if self.config.build_image:
            tools += ["umoci", "skopeo"]
        if self.config.start_agents:
            tools += ["runc"]
        if self.config.monitoring:
            tools += ["prometheus"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise PreflightError(
                f"missing tools: {', '.join(missing)} (Debian packages: etcd-server, "
                "docker-registry, skopeo, umoci, runc, nftables, iproute2, prometheus)"
            )
        if self.state_file.exists():
            raise PreflightError(
                f"dev cluster {self.name!r} is already up (state in {self.state_file}); "
                f"run `berth dev down --name {self.name}` first"
            )
        leftovers: list[str] = []
        if self.cluster_dir.exists():
            leftovers.append(str(self.cluster_dir))
        leftovers += [ns for ns in _netns_names() if _cluster_netns(ns, self.name)]
        leftovers += [
            str(lk.get("ifname"))
            for lk in _links()
            if lk.get("ifname") == self.bridge
            or str(lk.get("ifalias", "")).startswith(f"{LINK_ALIAS}/{self.name}/")
        ]
        if leftovers:
            found = ", ".join(leftovers[:5])
            raise PreflightError(
                f"leftovers of dev cluster {self.name!r} exist ({found}); "
                f"run `berth dev down --name {self.name}` first"
            )
        routes = _run(["ip", "-4", "route", "show"], check=False).stdout
        for net in (f"10.{210 + self.config.subnet_index}.", f"10.{220 + self.config.subnet_index}."):
            if any(line.startswith(net) for line in routes.splitlines()):
                raise PreflightError(
                    f"addresses {net}0.0/16 are already routed here "
                    "(another dev cluster?); pick another --subnet-index"
                )
        busy = [str(p) for p in self.config.ports() if not _port_free(p)]
        if busy:
            raise PreflightError(f"ports already in use: {', '.join(busy)}")

    def up(self, progress: Progress = lambda s: None) -> None:
        """Build the cluster. Fails with DevClusterError if it (or leftovers of it) already exists; after a
        failure part of it may exist: call ``down()``."""
        self._preflight()
        cfg = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._state = {
            "config": cfg.to_json(),
            "hosts": {},
            "processes": {},
            "image": None,
            "created": time.time(),
        }
        self._save()

        progress(f"network: bridge {self.bridge} {self.bridge_ip}/24")
        self._make_bridge()
        for i in range(1, cfg.hosts + 1):
            self._make_host(f"h{i}", i, cfg.host_cpus, cfg.host_memory, {})
            progress(f"host h{i}: netns {self.netns(f'h{i}')} address {self.host_address(f'h{i}')}")

        progress(f"etcd: starting on {self.etcd_endpoint}")
        self._start_etcd()
        progress(f"registry: starting on {self.registry_address}")
        self._start_registry()
        if cfg.build_image:
            try:
                ref = build_portal_image(
                    self.registry_address, work_dir=self.cluster_dir / "image", progress=progress
                )
            except ImageBuildError as e:
                raise DevClusterError(f"portal image: {e}") from e
            self._state["image"] = ref
            self._save()
            progress(f"image: pushed {ref}")
        if cfg.start_controller:
            progress(
                f"controller: starting on {self.controller_address} and {self.bridge_ip}:"
                f"{cfg.controller_port}"
            )
            self.start_controller()
        if cfg.start_agents:
            for host in self.hosts:
                progress(f"agent {host}: starting in {self.netns(host)}")
                self.start_agent(host)
        if cfg.monitoring:
            progress(
                f"prometheus: starting on {self.prometheus_url}, targets from http://{self.metrics_address}/sd"
            )
            self.start_prometheus()
        progress(f"dev cluster {self.name!r} is up: BERTH_ADDR={self.controller_address}")

    def _make_bridge(self) -> None:
        alias = f"{LINK_ALIAS}/{self.name}/bridge"
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", "dev", self.bridge, "alias", alias])
        _run(["ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge])
        _run(["ip", "link", "set", "dev", self.bridge, "up"])
        fwd = Path("/proc/sys/net/ipv4/ip_forward")
        self._state["ip_forward_before"] = fwd.read_text().strip()
        self._save()
        fwd.write_text("1")
        # Hosts reach the bridge IP (registry, controller), each other and the root namespace; nothing they
        # send is forwarded beyond this machine, so no masquerading is needed.
        rules = (
            f"table ip {self.nft_table} {{\n"
            f"  chain forward {{\n"
            f"    type filter hook forward priority 0; policy accept;\n"
            f'    iifname "{self.bridge}" oifname != "{self.bridge}" drop\n'
            f"  }}\n"
            f"}}\n"
        )
        _run(["nft", "-f", "-"], input=rules)

    def _make_host(
        self, name: str, index: int, cpus: str | None, memory: str | None, labels: Mapping[str, str]
    ) -> HostInfo:
        k = self.config.subnet_index
        info = HostInfo(
            name=name,
            index=index,
            netns=f"berth-{self.name}-{name}",
            address=f"10.{210 + k}.0.{10 + index}",
            subnet=f"10.{220 + k}.{index}.0/24",
            veth=_link_name("bv", self.name, name),
            state_dir=str(self.cluster_dir / "hosts" / name),
            cgroup_parent=f"berth-{self.name}-{name}",
            nft_table=f"berth_{self.name}_{name}",
            cpus=cpus,
            memory=memory,
            labels=dict(labels),
        )
        self._state.setdefault("hosts", {})[name] = info.to_json()
        self._save()
        Path(info.state_dir).mkdir(parents=True, exist_ok=True)
        ns = info.netns
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", info.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", "dev", info.veth, "alias", f"{LINK_ALIAS}/{self.name}/{name}"])
        _run(["ip", "link", "set", "dev", info.veth, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{info.address}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "dev", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.bridge_ip])
        _run(["nsenter", f"--net={NETNS_DIR / ns}", "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _run(["ip", "route", "add", info.subnet, "via", info.address, "dev", self.bridge])
        return info

    # ---- processes

    def _child_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
        }
        env[ENV_MARK] = self.name
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, key: str, argv: list[str], *, address: str = "") -> ProcessInfo:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{key}.log"
        with open(log, "ab") as out:
            out.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            try:
                p = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self._child_env(),
                    cwd=self.cluster_dir,
                )
            except FileNotFoundError as e:
                raise DevClusterError(f"{argv[0]} is not installed") from e
        self._popen[key] = p
        info = ProcessInfo(name=key, pid=p.pid, argv=argv, log=str(log), address=address)
        self._state.setdefault("processes", {})[key] = info.to_json()
        self._save()
        return info

    def _wait_ready(
        self, key: str, what: str, check: Callable[[], bool], timeout: float | None = None
    ) -> None:
        deadline = time.monotonic() + (timeout or self.config.ready_timeout)
        info = self._procs()[key]
        while True:
            if check():
                return
            if not self._alive(key):
                p = self._popen.get(key)
                code = f" (exit {p.returncode})" if p is not None and p.returncode is not None else ""
                raise DevClusterError(
                    f"{key} exited{code} before {what}; last lines of {info.log}:\n{_tail(info.log)}"
                )
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"{key}: timed out waiting for {what}; last lines of {info.log}:\n{_tail(info.log)}"
                )
            time.sleep(0.1)

    def _stop(self, key: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        info = self._procs().get(key)
        if info is None or not self._alive(key):
            return
        _kill(info.pid, sig)
        if sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            return  # e.g. SIGSTOP to simulate a hung process
        p = self._popen.get(key)
        if p is not None and p.pid == info.pid:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(info.pid, signal.SIGKILL)
                p.wait(5)
            return
        if _wait_gone([info.pid], timeout):
            _kill(info.pid, signal.SIGKILL)
            _wait_gone([info.pid], 5)

    def _start_etcd(self) -> None:
        cfg = self.config
        data = self.cluster_dir / "etcd"
        peer = f"http://127.0.0.1:{cfg.etcd_port + 1}"
        argv = [
            "etcd",
            "--name",
            f"berth-{self.name}",
            "--data-dir",
            str(data),
            "--listen-client-urls",
            self.etcd_endpoint,
            "--advertise-client-urls",
            self.etcd_endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"berth-{self.name}={peer}",
        ]
        self._spawn("etcd", argv, address=self.etcd_endpoint)

        def healthy() -> bool:
            status, body = _http_get(f"{self.etcd_endpoint}/health")
            if status != 200:
                return False
            try:
                return str(json.loads(body).get("health")) == "true"
            except (json.JSONDecodeError, AttributeError):
                return False

        self._wait_ready("etcd", "etcd reported healthy", healthy)

    def _start_registry(self) -> None:
        storage = self.cluster_dir / "registry"
        storage.mkdir(parents=True, exist_ok=True)
        conf = self.cluster_dir / "registry.yml"
        conf.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {json.dumps(str(storage))}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            "http:\n"
            f"  addr: {json.dumps(self.registry_address)}\n"
            f"  secret: {json.dumps(hashlib.sha256(os.urandom(16)).hexdigest())}\n"
            "health:\n  storagedriver:\n    enabled: false\n"
        )
        self._spawn("registry", ["docker-registry", "serve", str(conf)], address=self.registry_address)
        self._wait_ready(
            "registry",
            "the registry answered /v2/",
            lambda: _http_get(f"http://{self.registry_address}/v2/")[0] == 200,
        )

    def start_controller(self) -> None:
        """Start (or restart after ``stop_controller``) the controller; waits until its port accepts."""
        if self._alive("controller"):
            raise DevClusterError("the controller is already running")
        cfg = self.config
        argv = [
            cfg.python,
            "-m",
            "berth.controller",
            "--etcd",
            self.etcd_endpoint,
            "--listen",
            self.controller_address,
            "--listen",
            f"{self.bridge_ip}:{cfg.controller_port}",
            "--prefix",
            "/berth/",
            "--metrics-listen",
            self.metrics_address,
            *cfg.controller_args,
        ]
        both = f"{self.controller_address}, {self.bridge_ip}:{cfg.controller_port}"
        self._spawn("controller", argv, address=both)
        self._wait_ready(
            "controller",
            f"the controller accepted connections on {self.controller_address}",
            lambda: _tcp_accepts("127.0.0.1", cfg.controller_port),
        )

    def start_prometheus(self) -> None:
        """Start Prometheus (Debian's package) with deploy/prometheus/ (config and alert rules),
        its discovery pointed at this cluster's controller; waits until it is ready."""
        if self._alive("prometheus"):
            raise DevClusterError("prometheus is already running")
        work = self.cluster_dir / "prometheus"
        work.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DEPLOY_PROMETHEUS / "prometheus.yml").read_text())
        # a dev cluster is small: scrape every second, so a host lost for a few seconds shows
        config.setdefault("global", {})["scrape_interval"] = DEV_SCRAPE_INTERVAL
        for job in config.get("scrape_configs", []):
            job["scrape_interval"] = DEV_SCRAPE_INTERVAL
            for sd in job.get("http_sd_configs", []):
                sd["url"] = f"http://{self.metrics_address}/sd"
        (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copyfile(DEPLOY_PROMETHEUS / "alerts.yml", work / "alerts.yml")
        port = self.config.prometheus_port
        argv = [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1d",
        ]
        self._spawn("prometheus", argv, address=f"127.0.0.1:{port}")
        self._wait_ready(
            "prometheus",
            f"prometheus answered /-/ready on 127.0.0.1:{port}",
            lambda: _http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200,
        )

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        self._stop("controller", sig)

    def stop_etcd(self, sig: int = signal.SIGTERM) -> None:
        """Stop etcd (tests: the controller must ride out an etcd restart)."""
        self._stop("etcd", sig)

    def start_etcd(self) -> None:
        if self._alive("etcd"):
            raise DevClusterError("etcd is already running")
        self._start_etcd()
        self._save()

    def agent_argv(self, host: str) -> list[str]:
        """The exact command line of ``host``'s agent (run in the host's network namespace only)."""
        h = self.host(host)
        cfg = self.config
        argv = [
            "nsenter",
            f"--net={NETNS_DIR / h.netns}",
            "--",
            cfg.python,
            "-m",
            "berth.agent",
            "--controller",
            f"{self.bridge_ip}:{cfg.controller_port}",
            "--name",
            h.name,
            "--address",
            h.address,
            "--subnet",
            h.subnet,
            "--state-dir",
            h.state_dir,
            "--cgroup-parent",
            h.cgroup_parent,
            "--bridge",
            AGENT_BRIDGE,
            "--nft-table",
            h.nft_table,
            "--insecure-registry",
            self.registry_address,
        ]
        if h.cpus:
            argv += ["--cpus", h.cpus]
        if h.memory:
            argv += ["--memory", h.memory]
        for k, v in sorted(h.labels.items()):
            argv += ["--label", f"{k}={v}"]
        return argv + list(cfg.agent_args)

    def start_agent(self, host: str, *, grace: float = 0.5) -> None:
        """Start (or restart) ``host``'s agent; fails if it exits within ``grace`` seconds."""
        key = f"agent-{host}"
        if self._alive(key):
            raise DevClusterError(f"the agent of {host} is already running")
        h = self.host(host)
        self._spawn(key, self.agent_argv(host), address=h.address)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not self._alive(key):
                log = self._procs()[key].log
                raise DevClusterError(
                    f"the agent of {host} exited at start; last lines of {log}:\n{_tail(log)}"
                )
            time.sleep(0.05)

    def stop_agent(self, host: str, sig: int = signal.SIGTERM) -> None:
        """Signal ``host``'s agent (only the agent: its containers keep running); waits for it to exit for
        SIGTERM/SIGINT/SIGKILL (SIGKILL after 10 s of SIGTERM)."""
        self.host(host)
        self._stop(f"agent-{host}", sig)

    def agent_alive(self, host: str) -> bool:
        return self._alive(f"agent-{host}")

    def kill_host(self, host: str, *, timeout: float = 10.0) -> list[int]:
        """A host loses power: SIGKILL, at once, its agent, everything the agent started (runc, skopeo, ...),
        every process in the host's network namespace and every process in its cgroup parent (its
        containers, in every hierarchy), repeated until none is left. Nothing is cleaned up: runc's
        state stays on disk (``runc list`` shows the containers ``stopped``), as after a real power loss;
        ``start_agent`` brings the host back. Returns the pids killed. The kernel still closes the agent's
        sockets (its peers see FIN/RST): ``partition`` first for a loss nobody hears about."""
        h = self.host(host)
        key = f"agent-{host}"
        info = self._procs().get(key)
        agent = {info.pid} if info is not None and self._alive(key) else set()
        spared = _self_and_ancestors()
        cgroups = [c for c in _find_cgroups(h.cgroup_parent) if c.name == h.cgroup_parent]
        netns = NETNS_DIR / h.netns
        # Children of the agent first (while it still is their parent): a `runc run` in flight would
        # otherwise outlive it and start a container after the sweep.
        victims = agent | _descendants(agent)
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            for d in cgroups:
                _thaw(d)
                victims |= _cgroup_tree_pids(d)
            victims |= _netns_pids(netns)
            victims |= _descendants(victims)
            victims = {pid for pid in victims - spared if _running(pid)}
            if not victims:
                break
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"{host}: processes survived SIGKILL for {timeout:.0f}s: "
                    f"{', '.join(map(str, sorted(victims)))}"
                )
            for pid in victims:
                _kill(pid, signal.SIGKILL)
            killed |= victims
            _wait_gone(victims, 1.0)
        p = self._popen.get(key)
        if p is not None and info is not None and p.pid == info.pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)  # reap our own child: no zombie left behind
        return sorted(killed)

    def partitioned(self, host: str) -> bool:
        """True while ``host``'s link is down (``partition``)."""
        veth = self.host(host).veth
        for link in _links():
            if link.get("ifname") == veth:
                return "UP" not in link.get("flags", [])
        raise DevClusterError(f"{host}: its link {veth} does not exist")

    def partition(self, host: str) -> None:
        """Cut ``host`` off (a partition): the root-namespace end of its veth goes down, so no packet at all
        passes between the host and anything else (the bridge, the root namespace, other hosts), in either
        direction; its processes and containers keep running. ``heal`` undoes it."""
        _run(["ip", "link", "set", "dev", self.host(host).veth, "down"])

    def heal(self, host: str) -> None:
        """Bring ``host``'s link back up (after ``partition``); a no-op when it is up."""
        _run(["ip", "link", "set", "dev", self.host(host).veth, "up"])

    def add_host(
        self,
        name: str | None = None,
        *,
        cpus: str | None = None,
        memory: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> HostInfo:
        """Add one more host (netns + agent, when the cluster runs agents) to a running cluster."""
        if not self.is_up():
            raise DevClusterError(f"dev cluster {self.name!r} is not up")
        hosts = self.hosts
        index = max((h.index for h in hosts.values()), default=0) + 1
        if index > _MAX_HOST_INDEX:
            raise DevClusterError("no more host addresses")
        name = name or f"h{index}"
        if not _HOST_RE.match(name):
            raise DevClusterError(
                f"bad host name {name!r}: 1-8 lowercase letters and digits, starting with a letter"
            )
        if name in hosts:
            raise DevClusterError(f"host {name!r} already exists")
        info = self._make_host(name, index, cpus, memory, labels or {})
        if self.config.start_agents:
            self.start_agent(name)
        return info

    # ---- status and down

    def status(self) -> dict[str, Any]:
        """``{"name", "up", "base_dir", "controller_address", "registry_address", "etcd", "image",
        "processes": [{name, pid, alive, address, log}], "hosts": [{name, netns, address, subnet, ...,
        "agent_alive"}]}``."""
        procs = self._procs()
        return {
            "name": self.name,
            "up": self.is_up(),
            "base_dir": str(self.config.base_dir),
            "state_dir": str(self.cluster_dir),
            "controller_address": self.controller_address,
            "metrics_address": self.metrics_address,
            "prometheus_url": self.prometheus_url,
            "registry_address": self.registry_address,
            "etcd": self.etcd_endpoint,
            "bridge": {"name": self.bridge, "address": f"{self.bridge_ip}/24"},
            "image": self.image,
            "processes": [
                {"name": k, "pid": p.pid, "alive": self._alive(k), "address": p.address, "log": p.log}
                for k, p in procs.items()
            ],
            "hosts": [
                {
                    "name": h.name,
                    "netns": h.netns,
                    "address": h.address,
                    "subnet": h.subnet,
                    "veth": h.veth,
                    "state_dir": h.state_dir,
                    "cgroup_parent": h.cgroup_parent,
                    "cpus": h.cpus,
                    "memory": h.memory,
                    "labels": h.labels,
                    "agent_alive": self._alive(f"agent-{h.name}"),
                }
                for h in self.hosts.values()
            ],
        }

    def down(self) -> None:
        """Remove every trace of the cluster (processes, containers, mounts, netns, links, nft table, cgroups,
        files). Safe on a half-built or already-removed cluster. Raises DevClusterError listing anything
        that could not be removed."""
        if os.geteuid() != 0:
            raise DevClusterError("not root: berth dev needs root to remove network namespaces")
        state = _read_state(self.state_file) or self._state or None
        for p in self._popen.values():
            if p.poll() is None:
                _kill(p.pid, signal.SIGTERM)
        problems = _teardown(self.name, self.config.base_dir, state)
        for p in self._popen.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(1)
        self._popen.clear()
        self._state = {}
        if problems:
            raise DevClusterError(f"dev cluster {self.name!r}: could not remove: {', '.join(problems)}")

    @staticmethod
    def leftovers(prefix: str, base_dir: Path = DEFAULT_BASE_DIR) -> set[str]:
        """Names of dev clusters starting with ``prefix`` of which anything exists (running or not)."""
        names: set[str] = set()

        def add(candidate: str) -> None:
            if candidate.startswith(prefix) and _NAME_RE.match(candidate):
                names.add(candidate)

        for ns in _netns_names():
            parts = ns.split("-")
            if len(parts) >= 3 and parts[0] == "berth":
                add(parts[1])
            parts = ns.split("_")
            if len(parts) >= 3 and parts[0] == "berth":
                add(parts[1])
        for link in _links():
            alias = str(link.get("ifalias", "")).split("/")
            if len(alias) >= 3 and alias[0] == LINK_ALIAS:
                add(alias[1])
        for _, table in _nft_tables():
            if table.startswith("berth_dev_"):
                add(table.removeprefix("berth_dev_"))
        for c in _find_cgroups(f"berth-{prefix}"):
            parts = c.name.split("-")
            if len(parts) >= 3:
                add(parts[1])
        if base_dir.is_dir():
            for d in base_dir.iterdir():
                if d.is_dir():
                    add(d.name)
        for name in _marked_pids(prefix, prefix=True).values():
            add(name)
        return names

    @staticmethod
    def sweep(
        prefix: str, base_dir: Path = DEFAULT_BASE_DIR, skip: Callable[[str], bool] | None = None
    ) -> list[str]:
        """Remove leftovers of (crashed) dev clusters whose name starts with ``prefix``, except those for
        which ``skip(name)`` is true (e.g. a cluster of a test run still alive). Returns the names swept."""
        swept: list[str] = []
        for name in sorted(DevCluster.leftovers(prefix, base_dir)):
            if skip is not None and skip(name):
                continue
            _teardown(name, base_dir, _read_state(base_dir / name / "state.json"))
            swept.append(name)
        return swept
