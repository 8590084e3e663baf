"""Berth's pure scheduler: nodes and tasks in, a plan out.

No I/O, no clock, no protobuf: the controller converts its stored messages to the values of
:mod:`.model`, calls :func:`schedule`, and converts the :class:`Plan` back. See :mod:`.core` for
the flow (and :func:`explain`, the per-node verdicts for ``berth plan``), :mod:`.filters` for
feasibility and reason codes, :mod:`.scoring` for the ranking rule
and :mod:`.ports` for host port allocation; :mod:`.replicas` is the fast path for runs of identical
replicas (the same plan as placing them one by one).
"""

from .core import DEFAULT_DYNAMIC_PORTS, explain, schedule
from .filters import (
    REASON_INSUFFICIENT_CPU,
    REASON_INSUFFICIENT_MEMORY,
    REASON_NO_FREE_PORT,
    REASON_NO_NODES,
    REASON_NODE_DOWN,
    REASON_NODE_DRAINING,
    REASON_NODE_PAUSED,
    REASON_PORT_CONFLICT,
    constraint_reason,
    max_per_node_reason,
    scalar_reason,
)
from .model import (
    Availability,
    Constraint,
    NodeInfo,
    NodeVerdict,
    Pending,
    Placement,
    Plan,
    PortRequest,
    Resources,
    Strategy,
    TaskRequest,
)

__all__ = [
    "DEFAULT_DYNAMIC_PORTS",
    "REASON_INSUFFICIENT_CPU",
    "REASON_INSUFFICIENT_MEMORY",
    "REASON_NODE_DOWN",
    "REASON_NODE_DRAINING",
    "REASON_NODE_PAUSED",
    "REASON_NO_FREE_PORT",
    "REASON_NO_NODES",
    "REASON_PORT_CONFLICT",
    "Availability",
    "Constraint",
    "NodeInfo",
    "NodeVerdict",
    "Pending",
    "Placement",
    "Plan",
    "PortRequest",
    "Resources",
    "Strategy",
    "TaskRequest",
    "constraint_reason",
    "explain",
    "max_per_node_reason",
    "scalar_reason",
    "schedule",
]
