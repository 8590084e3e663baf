"""Cgroup bookkeeping for the containers of one agent.

runc creates (and on ``runc delete`` removes) each container's cgroup from the ``cgroupsPath``
we put in ``config.json``; this module knows where those directories end up on this machine so
the agent can read limits and counters back (tests, stats, OOM detection) and clean up what runc
leaves behind: runc never removes the *parent* directories it created on the way (our
``<cgroup_parent>``), and a crashed agent can leave a container's own directories too.

Both layouts are handled: cgroup v1 (one hierarchy per controller; on this machine ``cpu`` and
``cpuacct`` are separate mounts, plus ``name=systemd`` and a cgroup2 mount at
``/sys/fs/cgroup/unified`` in "hybrid" mode) and pure cgroup v2 (one unified hierarchy).
Everything here is plain file I/O on cgroupfs: fast and non-blocking enough to call from the
event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One mounted cgroup hierarchy: its mount point and controllers (empty set for cgroup2)."""

    mountpoint: Path
    controllers: frozenset[str]
    v2: bool


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def discover_hierarchies(mountinfo: Path = _MOUNTINFO) -> list[Hierarchy]:
    """The cgroup hierarchies mounted in this mount namespace (first mount of each wins)."""
    found: list[Hierarchy] = []
    seen: set[str] = set()
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts = left.split()
        rparts = right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        fstype, super_opts = rparts[0], rparts[2]
        if fstype not in ("cgroup", "cgroup2") or parts[3] != "/":
            continue  # only hierarchy roots; bind mounts of sub-cgroups are not ours to use
        mountpoint = _unescape(parts[4])
        if fstype == "cgroup2":
            key = "cgroup2"
            controllers: frozenset[str] = frozenset()
        else:
            ctrls = {
                o
                for o in super_opts.split(",")
                if o not in ("rw", "ro") and ("=" not in o or o.startswith("name="))
            }
            known = {
                "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "hugetlb",
                "net_cls", "net_prio", "perf_event", "rdma", "misc",
            }  # fmt: skip
            controllers = frozenset(c for c in ctrls if c in known or c.startswith("name="))
            if not controllers:
                continue
            key = ",".join(sorted(controllers))
        if key in seen:
            continue
        seen.add(key)
        found.append(Hierarchy(Path(mountpoint), controllers, fstype == "cgroup2"))
    return found


class Cgroups:
    """Paths, limits and counters of the cgroups under one agent's parent (``/<parent>/<task_id>``)."""

    def __init__(self, parent: str, *, hierarchies: list[Hierarchy] | None = None) -> None:
        parent = parent.strip("/")
        if not parent or ".." in parent.split("/"):
            raise ValueError(f"bad cgroup parent {parent!r}")
        self.parent = parent
        self.hierarchies = hierarchies if hierarchies is not None else discover_hierarchies()
        v1 = [h for h in self.hierarchies if not h.v2]
        #: True when the controllers live on cgroup v2 (no v1 controller hierarchy mounted).
        self.unified = not any(h.controllers - {"name=systemd"} for h in v1)

    # -- paths -----------------------------------------------------------------------------
    def cgroups_path(self, task_id: str) -> str:
        """The value for ``linux.cgroupsPath`` in the container's config.json."""
        return f"/{self.parent}/{task_id}"

    def _hierarchy(self, controller: str) -> Hierarchy | None:
        if self.unified:
            return next((h for h in self.hierarchies if h.v2), None)
        return next((h for h in self.hierarchies if controller in h.controllers), None)

    def path(self, controller: str, task_id: str) -> Path | None:
        """Directory of ``task_id``'s cgroup for ``controller`` (v1), or its unified dir (v2)."""
        h = self._hierarchy(controller)
        return None if h is None else h.mountpoint / self.parent / task_id

    def all_dirs(self, task_id: str) -> list[Path]:
        """Every directory (in every hierarchy) that may hold ``task_id``'s cgroup."""
        return [h.mountpoint / self.parent / task_id for h in self.hierarchies]

    def parent_dirs(self) -> list[Path]:
        return [h.mountpoint / self.parent for h in self.hierarchies]

    # -- reading back ---------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def memory_limit(self, task_id: str) -> int | None:
        """Memory limit in bytes, or None when unlimited or the cgroup is gone."""
        d = self.path("memory", task_id)
        if d is None:
            return None
        raw = self._read(d / ("memory.max" if self.unified else "memory.limit_in_bytes"))
        if raw is None or raw == "max":
            return None
        value = int(raw)
        return None if value >= 1 << 62 else value  # v1 reports "unlimited" as a huge number

    def cpu_quota(self, task_id: str) -> tuple[int, int] | None:
        """(quota, period) in microseconds, or None when there is no quota (or no cgroup)."""
        d = self.path("cpu", task_id)
        if d is None:
            return None
        if self.unified:
            raw = self._read(d / "cpu.max")
            if raw is None:
                return None
            quota, _, period = raw.partition(" ")
            return None if quota == "max" else (int(quota), int(period))
        q = self._read(d / "cpu.cfs_quota_us")
        p = self._read(d / "cpu.cfs_period_us")
        if q is None or p is None or int(q) < 0:
            return None
        return int(q), int(p)

    def cpu_shares(self, task_id: str) -> int | None:
        d = self.path("cpu", task_id)
        if d is None:
            return None
        raw = self._read(d / ("cpu.weight" if self.unified else "cpu.shares"))
        return None if raw is None else int(raw)

    def pids_limit(self, task_id: str) -> int | None:
        d = self.path("pids", task_id)
        raw = self._read(None if d is None else d / "pids.max")
        return None if raw is None or raw == "max" else int(raw)

    def memory_usage(self, task_id: str) -> int | None:
        d = self.path("memory", task_id)
        if d is None:
            return None
        raw = self._read(d / ("memory.current" if self.unified else "memory.usage_in_bytes"))
        return None if raw is None else int(raw)

    def oom_kills(self, task_id: str) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 when unknown/gone).

        v2: ``memory.events`` ``oom_kill``. v1: ``memory.oom_control`` ``oom_kill`` (kernels
        ≥ 4.13); on older kernels fall back to "the limit was hit and the cgroup is/was under
        OOM", which is the best v1 can tell.
        """
        d = self.path("memory", task_id)
        if d is None:
            return 0
        if self.unified:
            return _kv(self._read(d / "memory.events")).get("oom_kill", 0)
        ctl = _kv(self._read(d / "memory.oom_control"))
        if "oom_kill" in ctl:
            return ctl["oom_kill"]
        if ctl.get("under_oom", 0):
            return 1
        failcnt = self._read(d / "memory.failcnt")
        return 1 if failcnt is not None and int(failcnt) > 0 and self.memory_limit(task_id) else 0

    def stats(self, task_id: str) -> ContainerStats | None:
        """Usage counters and limits of ``task_id``'s cgroup (for ``/metrics``), or None when
        the cgroup is gone, or goes while being read (the container just exited), or a needed
        controller is not mounted. Values are parsed by ``stats_v1``/``stats_v2``."""
        if self.unified:
            d = self.path("memory", task_id)
            if d is None:
                return None
            files = _read_all({name: d / name for name in V2_FILES})
            return None if files is None else stats_v2(files)
        dirs = {c: self.path(c, task_id) for c in ("cpu", "cpuacct", "memory")}
        paths: dict[str, Path] = {}
        for name in V1_FILES:
            d = dirs[name.split(".", 1)[0]]
            if d is None:
                return None
            paths[name] = d / name
        files = _read_all(paths)
        return None if files is None else stats_v1(files)

    # -- cleanup ---------------------------------------------------------------------------
    def remove(self, task_id: str, *, timeout: float = 5.0) -> None:
        """Remove the container's cgroup dirs, then the agent's parent dirs if now empty.

        Never raises for directories that are already gone; a cgroup that still has processes
        (EBUSY) is retried until ``timeout`` and then left with a warning.
        """
        deadline = time.monotonic() + timeout
        for d in self.all_dirs(task_id):
            _rmdir_tree(d, deadline)
        self.remove_parent_if_empty()

    def remove_parent_if_empty(self) -> None:
        for d in self.parent_dirs():
            # walk up the parent path: we created every component below the hierarchy root
            cur = d
            for _ in range(len(Path(self.parent).parts)):
                try:
                    cur.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        log.warning("cannot remove cgroup %s: %s", cur, e)
                    break
                cur = cur.parent


# -- usage statistics (pure parsing; ``Cgroups.stats`` does the reading) ----------------------

_UNLIMITED = 1 << 62  # v1 reports "no memory limit" as PAGE_COUNTER_MAX pages (~2^63)
DEFAULT_CPU_PERIOD_US = 100_000

#: Files ``stats_v1`` needs, named by their file name (the prefix names the v1 controller).
V1_FILES = (
    "cpuacct.usage",  # ns
    "cpu.stat",  # nr_periods / nr_throttled / throttled_time (ns)
    "cpu.cfs_quota_us",  # -1 = no quota
    "cpu.cfs_period_us",
    "memory.usage_in_bytes",
    "memory.stat",  # total_inactive_file (hierarchical)
    "memory.limit_in_bytes",  # ~2^63 = no limit
)
#: Files ``stats_v2`` needs, all in the container's one unified directory.
V2_FILES = (
    "cpu.stat",  # usage_usec, throttled_usec (the latter only with the cpu controller)
    "cpu.max",  # "$QUOTA $PERIOD" or "max $PERIOD"
    "memory.current",
    "memory.stat",  # inactive_file
    "memory.max",  # bytes or "max"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerStats:
    """One container's counters and limits in cAdvisor's units; 0 means "no limit"."""

    cpu_usage_seconds: float
    cpu_throttled_seconds: float
    memory_usage_bytes: int
    memory_working_set_bytes: int  # usage minus inactive file pages, never below 0
    memory_limit_bytes: int
    cpu_quota_us: int  # per period
    cpu_period_us: int


def parse_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``cpu.stat``, ``memory.stat``): ``key value`` per line."""
    return _kv(text)


def _int(text: str) -> int:
    return int(text.strip())


def _working_set(usage: int, inactive_file: int) -> int:
    return max(0, usage - inactive_file)


def stats_v1(files: Mapping[str, str]) -> ContainerStats:
    """Parse the cgroup v1 files named in ``V1_FILES`` (file name -> content)."""
    usage = _int(files["memory.usage_in_bytes"])
    mem_stat = parse_keyed(files["memory.stat"])
    limit = _int(files["memory.limit_in_bytes"])
    quota = _int(files["cpu.cfs_quota_us"])
    return ContainerStats(
        cpu_usage_seconds=_int(files["cpuacct.usage"]) / 1e9,
        cpu_throttled_seconds=parse_keyed(files["cpu.stat"]).get("throttled_time", 0) / 1e9,
        memory_usage_bytes=usage,
        memory_working_set_bytes=_working_set(usage, mem_stat.get("total_inactive_file", 0)),
        memory_limit_bytes=0 if limit >= _UNLIMITED else limit,
        cpu_quota_us=max(0, quota),
        cpu_period_us=_int(files["cpu.cfs_period_us"]),
    )


def parse_cpu_max(text: str) -> tuple[int, int]:
    """cgroup v2 ``cpu.max`` -> (quota, period) in microseconds; quota 0 when it is ``max``."""
    quota, _, period = text.strip().partition(" ")
    return (0 if quota == "max" else int(quota)), (int(period) if period else DEFAULT_CPU_PERIOD_US)


def stats_v2(files: Mapping[str, str]) -> ContainerStats:
    """Parse the cgroup v2 files named in ``V2_FILES`` (file name -> content)."""
    cpu_stat = parse_keyed(files["cpu.stat"])
    usage = _int(files["memory.current"])
    inactive_file = parse_keyed(files["memory.stat"]).get("inactive_file", 0)
    mem_max = files["memory.max"].strip()
    quota, period = parse_cpu_max(files["cpu.max"])
    return ContainerStats(
        cpu_usage_seconds=cpu_stat["usage_usec"] / 1e6,
        cpu_throttled_seconds=cpu_stat.get("throttled_usec", 0) / 1e6,
        memory_usage_bytes=usage,
        memory_working_set_bytes=_working_set(usage, inactive_file),
        memory_limit_bytes=0 if mem_max == "max" else int(mem_max),
        cpu_quota_us=quota,
        cpu_period_us=period,
    )


def _read_all(paths: Mapping[str, Path]) -> dict[str, str] | None:
    """Read every file, or None if any is missing: the cgroup was removed (ENOENT on open, ENODEV
    on reading a file whose cgroup was removed after the open)."""
    out: dict[str, str] = {}
    for name, path in paths.items():
        try:
            out[name] = path.read_text()
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV):
                return None
            raise
    return out


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


def _rmdir_tree(d: Path, deadline: float) -> None:
    """rmdir a cgroup and its sub-cgroups (cgroupfs dirs are removed with rmdir, never unlink)."""
    if not d.exists():
        return
    for sub in sorted((p for p in d.iterdir() if p.is_dir()), reverse=True):
        _rmdir_tree(sub, deadline)
    while True:
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", d, e)
                return
            time.sleep(0.05)
