"""The metrics Berth exports: the one list the monitoring config (deploy/) is checked against.

``METRICS`` maps a metric family name to ``(type, sorted label names)``; ``HELP`` holds its help text.
Prometheus adds ``job`` and ``instance`` at scrape time; histograms expose ``_bucket`` (plus ``le``),
``_sum`` and ``_count`` series; counter names include their ``_total`` suffix here.
"""

from __future__ import annotations

from typing import Final, Literal

MetricType = Literal["counter", "gauge", "histogram"]

_CONTAINER: Final[tuple[str, ...]] = ("node", "service", "task")

METRICS: Final[dict[str, tuple[MetricType, tuple[str, ...]]]] = {
    # Controller, scraped at the controller's metrics address.
    "berth_build_info": ("gauge", ("python_version", "version")),
    "berth_controller_leader": ("gauge", ()),
    "berth_service_desired_replicas": ("gauge", ("service",)),
    "berth_service_running_replicas": ("gauge", ("service",)),
    "berth_tasks_pending": ("gauge", ("reason", "service")),
    "berth_nodes": ("gauge", ("state",)),
    "berth_node_up": ("gauge", ("node",)),
    "berth_node_capacity": ("gauge", ("node", "resource")),
    "berth_node_allocated": ("gauge", ("node", "resource")),
    "berth_scheduling_attempts_total": ("counter", ("result",)),
    "berth_placement_latency_seconds": ("histogram", ()),
    "berth_node_down_events_total": ("counter", ()),
    "berth_failover_seconds": ("histogram", ()),
    "berth_reconcile_duration_seconds": ("histogram", ()),
    "berth_grpc_requests_total": ("counter", ("code", "method")),
    "berth_grpc_request_duration_seconds": ("histogram", ("method",)),
    # prometheus_client's process and GC collectors, on the controller's registry
    "process_virtual_memory_bytes": ("gauge", ()),
    "process_resident_memory_bytes": ("gauge", ()),
    "process_start_time_seconds": ("gauge", ()),
    "process_cpu_seconds_total": ("counter", ()),
    "process_open_fds": ("gauge", ()),
    "process_max_fds": ("gauge", ()),
    "python_gc_objects_collected_total": ("counter", ("generation",)),
    "python_gc_objects_uncollectable_total": ("counter", ("generation",)),
    "python_gc_collections_total": ("counter", ("generation",)),
    # Agent, scraped at each agent's metrics address (cAdvisor names for container_*).
    "container_cpu_usage_seconds_total": ("counter", _CONTAINER),
    "container_memory_working_set_bytes": ("gauge", _CONTAINER),
    "container_memory_usage_bytes": ("gauge", _CONTAINER),
    "container_spec_memory_limit_bytes": ("gauge", _CONTAINER),
    "container_spec_cpu_quota": ("gauge", _CONTAINER),
    "container_spec_cpu_period": ("gauge", _CONTAINER),
    "container_cpu_cfs_throttled_seconds_total": ("counter", _CONTAINER),
    "container_start_time_seconds": ("gauge", _CONTAINER),
    "berth_agent_task_restarts_total": ("counter", _CONTAINER),
    "berth_agent_image_pull_duration_seconds": ("histogram", ("node",)),
    "berth_agent_heartbeat_rtt_seconds": ("gauge", ("node",)),
}

HELP: Final[dict[str, str]] = {
    "berth_build_info": "Build information; always 1.",
    "berth_controller_leader": "1 when this controller is the writer of desired state, else 0.",
    "berth_service_desired_replicas": "Replicas a service asks for.",
    "berth_service_running_replicas": "Tasks of a service that are running.",
    "berth_tasks_pending": "Tasks that are not placed on a node, by service and pending reason.",
    "berth_nodes": "Nodes known to the controller, by state (ready, down).",
    "berth_node_up": "1 when the node is ready, 0 when it is down.",
    "berth_node_capacity": "Node capacity by resource (cpu in cores, memory in bytes, named scalars).",
    "berth_node_allocated": "Resources requested by the tasks placed on a node, by resource.",
    "berth_scheduling_attempts_total": "Scheduling attempts for a task, by result (placed, pending).",
    "berth_placement_latency_seconds": "Time from a task's creation to its commit with a node.",
    "berth_node_down_events_total": "Times a node was declared down.",
    "berth_failover_seconds": "Time from a node declared down to all its tasks running elsewhere again.",
    "berth_reconcile_duration_seconds": "Duration of one reconcile pass.",
    "berth_grpc_requests_total": "gRPC requests handled by the controller, by method and status code.",
    "berth_grpc_request_duration_seconds": "Duration of gRPC requests handled by the controller, by method.",
    "process_virtual_memory_bytes": "Virtual memory size in bytes.",
    "process_resident_memory_bytes": "Resident memory size in bytes.",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds.",
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds.",
    "process_open_fds": "Number of open file descriptors.",
    "process_max_fds": "Maximum number of open file descriptors.",
    "python_gc_objects_collected_total": "Objects collected during gc.",
    "python_gc_objects_uncollectable_total": "Uncollectable objects found during GC.",
    "python_gc_collections_total": "Number of times this generation was collected.",
    "container_cpu_usage_seconds_total": "Cumulative CPU time consumed by the container.",
    "container_memory_working_set_bytes": "Current working set of the container.",
    "container_memory_usage_bytes": "Current memory usage of the container, including page cache.",
    "container_spec_memory_limit_bytes": "Memory limit of the container (0 when unlimited).",
    "container_spec_cpu_quota": "CPU quota of the container in microseconds per period.",
    "container_spec_cpu_period": "CPU period of the container in microseconds.",
    "container_cpu_cfs_throttled_seconds_total": "Total time the container was throttled by CFS.",
    "container_start_time_seconds": "Start time of the container since the Unix epoch.",
    "berth_agent_task_restarts_total": "Times the agent restarted a task's container.",
    "berth_agent_image_pull_duration_seconds": "Duration of image pulls on the node.",
    "berth_agent_heartbeat_rtt_seconds": "Round-trip time of the agent's last heartbeat to the controller.",
}

CONTROLLER_METRICS: Final[frozenset[str]] = frozenset(
    name for name in METRICS if not name.startswith(("container_", "berth_agent_"))
)
"""Families the controller exports."""

AGENT_METRICS: Final[frozenset[str]] = frozenset(
    name for name in METRICS if name.startswith(("container_", "berth_agent_")) or name == "berth_build_info"
)
"""Families each agent exports."""

CONTAINER_METRICS: Final[frozenset[str]] = frozenset(
    name for name in AGENT_METRICS if name.startswith("container_")
)
"""The per-container series (cAdvisor's names), read from the container's cgroup."""

TARGET_LABELS: Final[tuple[str, ...]] = ("instance", "job")
"""Labels Prometheus attaches to every scraped series."""

HISTOGRAM_SUFFIXES: Final[tuple[str, ...]] = ("_bucket", "_sum", "_count")


def series_names() -> dict[str, str]:
    """Every series name a scrape yields, mapped to its family (histograms expand to three)."""
    names: dict[str, str] = {}
    for name, (kind, _labels) in METRICS.items():
        if kind == "histogram":
            names.update({name + suffix: name for suffix in HISTOGRAM_SUFFIXES})
        else:
            names[name] = name
    return names
