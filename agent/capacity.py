"""What this host offers: detected CPU and memory (overridable), and its address."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess


def detect_cpu_millis() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        count = os.cpu_count() or 1
    return count * 1000


def detect_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def detect_address() -> str:
    """The first global IPv4 address in this network namespace (the host's address)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            addr = ipaddress.ip_address(info["local"])
            if (
                not addr.is_loopback
                and info.get("scope") == "global"
                and not link["ifname"].startswith("berth")
            ):
                return str(addr)
    return "127.0.0.1"
