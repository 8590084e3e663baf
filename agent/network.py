"""Bridge networking for one agent's containers, Docker-bridge style, with ip(8) and nft(8).

Everything is created in the network namespace the agent runs in (a real host, or a "host"
namespace of the test cluster), so several agents share one machine without seeing each other:

* host side (``setup_host``, idempotent, run at agent start): a bridge holding the subnet's first
  address, ``ip_forward`` on, and one nftables table owned by the agent::

      map ports        (proto . host port) -> (container ip . container port)
      prerouting/output (nat, priority -100): fib daddr type local dnat ip to ... map @ports
      postrouting      masquerade: subnet leaving via a non-bridge interface, and hairpin /
                       loopback-originated traffic DNATed onto the bridge

  Publishing a port is adding one map element and unpublishing deletes exactly the elements
  pointing at that container's address — one atomic nft operation, no rule handles to track, and
  other containers' mappings are never touched. A host port already mapped is refused by the
  kernel (EEXIST), which is exactly the "port in use" check we want.
* per container (``attach``): a named netns, a veth pair (host end on the bridge, peer created
  directly inside the netns as ``eth0``), an address, a default route via the bridge, ``lo`` up.
  Names derive from a hash of (table, task id): deterministic, so ``detach`` needs no state, and
  host-side interface names stay within the kernel's 15 characters.
* IPAM: one file per address under ``<state_dir>/ipam/`` created with O_EXCL (so a claim is atomic
  and survives agent restarts) plus a per-task file for lookup; allocation continues after the
  last address handed out, so a released address is not reused right away.

``network: host`` containers get none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth.agent.runtime import ContainerError, PortBinding

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


def sanitize_table_name(name: str) -> str:
    """A valid nft table name (letters, digits, underscore) from e.g. ``berth_<agent name>``."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not out or not out[0].isalpha():
        out = "b" + out
    return out[:60]


@dataclass(frozen=True, slots=True)
class ContainerNet:
    netns: str  # name under /run/netns; "" with host networking
    netns_path: str
    host_if: str
    ip: str


class Ipam:
    """File-backed address allocation in one subnet (gateway = first host address)."""

    def __init__(self, directory: Path, subnet: ipaddress.IPv4Network) -> None:
        self.dir = directory
        self.subnet = subnet
        self.gateway = next(subnet.hosts())

    def _task_file(self, task_id: str) -> Path:
        return self.dir / f"task-{task_id}"

    def lookup(self, task_id: str) -> str | None:
        try:
            return self._task_file(task_id).read_text().strip() or None
        except FileNotFoundError:
            return None

    def allocate(self, task_id: str) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self.lookup(task_id)
        if existing:
            return existing
        hosts = [h for h in self.subnet.hosts() if h != self.gateway]
        last_file = self.dir / "last"
        start = 0
        with contextlib.suppress(OSError, ValueError):
            last = ipaddress.IPv4Address(last_file.read_text().strip())
            start = hosts.index(last) + 1
        for i in range(len(hosts)):
            addr = hosts[(start + i) % len(hosts)]
            try:
                fd = os.open(self.dir / f"ip-{addr}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(task_id)
            _write_atomic(self._task_file(task_id), str(addr))
            _write_atomic(last_file, str(addr))
            return str(addr)
        raise ContainerError(f"no free address left in {self.subnet}", retryable=True)

    def release(self, task_id: str) -> None:
        ip = self.lookup(task_id)
        if ip:
            f = self.dir / f"ip-{ip}"
            with contextlib.suppress(OSError):
                if f.read_text().strip() == task_id:
                    f.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._task_file(task_id).unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class HostNetwork:
    """The bridge, NAT table and per-container namespaces of one agent."""

    def __init__(self, *, state_dir: Path, bridge: str, subnet: str, nft_table: str) -> None:
        if not bridge or len(bridge) > 15:
            raise ValueError(f"bad bridge name {bridge!r}")
        self.bridge = bridge
        self.subnet = ipaddress.IPv4Network(subnet, strict=False)
        self.table = sanitize_table_name(nft_table)
        self.ipam = Ipam(Path(state_dir) / "ipam", self.subnet)
        self.gateway = str(self.ipam.gateway)
        self._host_ready = False
        self._lock = asyncio.Lock()

    # -- names -----------------------------------------------------------------------------
    def _hash(self, task_id: str) -> str:
        return hashlib.sha256(f"{self.table}/{task_id}".encode()).hexdigest()

    def netns_name(self, task_id: str) -> str:
        return f"{self.table}-{self._hash(task_id)[:12]}"

    def netns_path(self, task_id: str) -> str:
        return str(NETNS_DIR / self.netns_name(task_id))

    def host_if(self, task_id: str) -> str:
        return "vb" + self._hash(task_id)[:12]

    # -- host side -------------------------------------------------------------------------
    async def setup_host(self) -> None:
        """Create (or repair) bridge, forwarding and the NAT table. Keeps existing port mappings."""
        async with self._lock:
            if self._host_ready:
                return
            rc, _, err = await _run("ip", "link", "add", self.bridge, "type", "bridge")
            if rc != 0 and "exists" not in err:
                raise ContainerError(f"cannot create bridge {self.bridge}: {_line(err)}")
            prefix = self.subnet.prefixlen
            await _ip("addr", "replace", f"{self.gateway}/{prefix}", "dev", self.bridge)
            await _ip("link", "set", self.bridge, "up")
            _sysctl("net/ipv4/ip_forward", "1")
            # lets the host reach published ports as 127.0.0.1:port (DNAT out of loopback)
            _sysctl(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")
            t, br, sn = self.table, self.bridge, str(self.subnet)
            script = f"""
add table ip {t}
add map ip {t} ports {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
add chain ip {t} prerouting {{ type nat hook prerouting priority -100; policy accept; }}
add chain ip {t} output {{ type nat hook output priority -100; policy accept; }}
add chain ip {t} postrouting {{ type nat hook postrouting priority 100; policy accept; }}
flush chain ip {t} prerouting
flush chain ip {t} output
flush chain ip {t} postrouting
add rule ip {t} prerouting fib daddr type local dnat ip to meta l4proto . th dport map @ports
add rule ip {t} output fib daddr type local dnat ip to meta l4proto . th dport map @ports
add rule ip {t} postrouting ip saddr {sn} oifname != "{br}" masquerade
add rule ip {t} postrouting oifname "{br}" ip saddr {sn} ct status dnat masquerade
add rule ip {t} postrouting oifname "{br}" ip saddr 127.0.0.0/8 masquerade
"""
            rc, _, err = await _run("nft", "-f", "-", stdin=script)
            if rc != 0:
                raise ContainerError(f"cannot set up nftables table {t}: {_line(err)}")
            self._host_ready = True

    async def teardown_host(self) -> None:
        """Remove the bridge and the agent's nft table (``berth dev down``, tests)."""
        async with self._lock:
            await _run("nft", "delete", "table", "ip", self.table)
            await _run("ip", "link", "del", self.bridge)
            self._host_ready = False

    # -- per container ---------------------------------------------------------------------
    async def attach(self, task_id: str, ports: Sequence[PortBinding]) -> ContainerNet:
        """Netns + veth + address + routes + published ports for one container (idempotent)."""
        await self.setup_host()
        ns, vh = self.netns_name(task_id), self.host_if(task_id)
        ip = self.ipam.allocate(task_id)
        try:
            if not (NETNS_DIR / ns).exists():
                await _ip("netns", "add", ns)
            rc, _, _ = await _run("ip", "link", "show", vh)
            if rc != 0:
                await _ip("link", "add", vh, "type", "veth", "peer", "name", "eth0", "netns", ns)
            await _ip("link", "set", vh, "master", self.bridge, "up")
            await _ip("-n", ns, "addr", "replace", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
            await _ip("-n", ns, "link", "set", "eth0", "up")
            await _ip("-n", ns, "link", "set", "lo", "up")
            await _ip("-n", ns, "route", "replace", "default", "via", self.gateway)
            await self.publish(ip, ports)
        except BaseException:
            await self.detach(task_id)
            raise
        return ContainerNet(netns=ns, netns_path=str(NETNS_DIR / ns), host_if=vh, ip=ip)

    async def publish(self, ip: str, ports: Iterable[PortBinding]) -> None:
        elems = [f"{p.protocol} . {p.host_port} : {ip} . {p.container_port}" for p in ports]
        if not elems:
            return
        rc, _, err = await _run(
            "nft", "add", "element", "ip", self.table, "ports", "{ " + ", ".join(elems) + " }"
        )
        if rc != 0:
            if "File exists" in err:
                taken = ", ".join(f"{p.host_port}/{p.protocol}" for p in ports)
                raise ContainerError(f"host port already published by another container ({taken})")
            raise ContainerError(f"cannot publish ports: {_line(err)}")

    async def published(self) -> list[tuple[str, int, str, int]]:
        """Current mappings as (proto, host port, container ip, container port)."""
        rc, out, _ = await _run("nft", "-j", "list", "map", "ip", self.table, "ports")
        if rc != 0:
            return []
        result: list[tuple[str, int, str, int]] = []
        for obj in json.loads(out).get("nftables", []):
            m: dict[str, Any] = obj.get("map") or {}
            for elem in m.get("elem", []):
                try:
                    key, value = elem
                    proto, hport = key["concat"]
                    cip, cport = value["concat"]
                    result.append((str(proto), int(hport), str(cip), int(cport)))
                except (TypeError, ValueError, KeyError):
                    log.debug("unexpected nft map element %r", elem)
        return result

    async def unpublish(self, ip: str) -> None:
        keys = [f"{proto} . {hport}" for proto, hport, cip, _ in await self.published() if cip == ip]
        if keys:
            rc, _, err = await _run(
                "nft", "delete", "element", "ip", self.table, "ports", "{ " + ", ".join(keys) + " }"
            )
            if rc != 0:
                log.warning("cannot unpublish ports of %s: %s", ip, _line(err))

    async def detach(self, task_id: str) -> None:
        """Remove ports, veth, netns and address of a container. Never fails on missing pieces."""
        ip = self.ipam.lookup(task_id)
        if ip:
            await self.unpublish(ip)
        await _run("ip", "link", "del", self.host_if(task_id))
        ns = self.netns_name(task_id)
        if (NETNS_DIR / ns).exists():
            rc, _, err = await _run("ip", "netns", "del", ns)
            if rc != 0:
                log.warning("cannot delete netns %s: %s", ns, _line(err))
        self.ipam.release(task_id)


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise ContainerError(f"cannot set {key.replace('/', '.')}={value}: {e.strerror}") from e


def _line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else "unknown error"


async def _ip(*args: str) -> None:
    rc, _, err = await _run("ip", *args)
    if rc != 0:
        raise ContainerError(f"ip {' '.join(args)}: {_line(err)}")


async def _run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    log.debug("%s -> %s %s", argv, proc.returncode, err.strip()[:200])
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
