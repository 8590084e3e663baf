"""The container runtime port of the agent.

The task runners (``berth.agent.tasks``) drive containers only through ``ContainerRuntime``;
``berth.agent.runc`` is the one implementation that runs real containers, and the only module
that invokes the ``runc`` binary. Keeping the port narrow keeps the lifecycle logic testable and
lets the scale benchmarks use a recording runtime (clearly named "hollow") without touching
the runners.

Lifecycle per task, as in SwarmKit's executor: ``pull`` → ``create`` (bundle, rootfs, network,
cgroup; nothing runs yet) → ``start`` → ``wait`` → (``start`` again on restart) → ``stop`` →
``remove`` (everything the task created is gone afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol


class RuntimeFailure(Exception):
    """Base of runtime failures; ``reason`` is a short message fit for ``berth service ps``."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class ImagePullError(RuntimeFailure):
    """The image could not be pulled or verified (unknown name, tag, digest mismatch, registry down)."""


class ContainerError(RuntimeFailure):
    """Preparing, starting or stopping a container failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortBinding:
    container_port: int
    host_port: int
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageInfo:
    """A pulled image, unpacked once per manifest digest and shared read-only by containers."""

    reference: str
    digest: str  # sha256:... of the manifest
    rootfs: str  # path of the unpacked, read-only lower dir
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "K=V" as in the image config
    workdir: str = "/"
    user: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerSpec:
    """Everything needed to build one task's container; saved with the bundle for recovery."""

    task_id: str
    service: str
    slot: int
    node_name: str
    image: str
    args: tuple[str, ...] = ()  # replaces the image CMD, keeps ENTRYPOINT
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_millis: int = 0  # 0 = no quota
    memory_bytes: int = 0  # 0 = no limit
    pids_limit: int = 512
    network: Literal["bridge", "host"] = "bridge"
    ports: tuple[PortBinding, ...] = ()
    # on_disconnect: stop. Saved with the bundle: an agent restarted while cut off from the
    # controller finds these among the containers it recovers, and its watchdog stops them
    at_most_one: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningContainer:
    task_id: str
    pid: int
    ip: str  # container address on the host bridge; "" with host networking
    image_digest: str
    started_at: float  # unix seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitStatus:
    exit_code: int | None  # None when unknown (process was not our child, e.g. after re-adoption)
    oom_killed: bool = False
    signal: int | None = None

    def describe(self) -> str:
        if self.oom_killed:
            return "OOM killed (memory limit reached)"
        if self.signal:
            return f"killed by signal {self.signal}"
        if self.exit_code is None:
            return "exited"
        return f"exited with code {self.exit_code}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerRecord:
    """A container this agent created earlier, as found on disk (used to re-adopt after a restart)."""

    spec: ContainerSpec
    image_digest: str
    ip: str
    running: RunningContainer | None  # None if created but not running


class ContainerRuntime(Protocol):
    async def pull(self, reference: str) -> ImageInfo:
        """Fetch (or reuse by digest) and unpack an image. Raises ImagePullError."""
        ...

    async def create(self, spec: ContainerSpec, image: ImageInfo) -> None:
        """Prepare bundle, overlay rootfs, network namespace + veth + IP + port rules and cgroup."""
        ...

    async def start(self, task_id: str) -> RunningContainer:
        """Start (or restart after an exit) the created container."""
        ...

    async def wait(self, task_id: str) -> ExitStatus:
        """Return once the container's process has exited."""
        ...

    async def stop(self, task_id: str, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; returns when the process is gone."""
        ...

    async def remove(self, task_id: str) -> None:
        """Remove everything ``create`` made. Idempotent."""
        ...

    async def list(self) -> list[ContainerRecord]:
        """Containers this agent created and has not removed."""
        ...
