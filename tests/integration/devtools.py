"""Shared helpers for integration tests that build dev clusters: unique names, free ports and
subnets, and a census of everything on the machine that still carries a cluster's name."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from berth.cli.devcluster import DevClusterConfig, free_port_pairs, free_subnet_index
from berth.cli.devcluster import owner_alive as cluster_owner_alive

BASE_DIR = Path("/var/tmp/berth-devtest")


def owner_alive(name: str) -> bool:
    return cluster_owner_alive(name, "dt")


def free_ports(n: int) -> list[int]:
    return free_port_pairs(n, 20000, 30000)


def free_subnet() -> int:
    index = free_subnet_index(range(9, 0, -1))
    if index is None:
        pytest.skip("no free dev-cluster subnet (10.211-219 all in use)")
    return index


def make_config(suffix: str, hosts: int = 2) -> DevClusterConfig:
    etcd, registry, controller = free_ports(3)
    return DevClusterConfig(
        name=f"dt{os.getpid()}{suffix}",
        hosts=hosts,
        base_dir=BASE_DIR,
        etcd_port=etcd,
        registry_port=registry,
        controller_port=controller,
        subnet_index=free_subnet(),
    )


def traces(name: str) -> list[str]:
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
