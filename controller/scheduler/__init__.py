"""Berth's pure scheduler: nodes and tasks in, a plan out.

No I/O, no clock, no protobuf: the controller converts its stored messages to the values of
:mod:`.model`, calls :func:`schedule`, and converts the :class:`Plan` back. See :mod:`.core` for
the flow, :mod:`.filters` for feasibility and reason codes, :mod:`.scoring` for the ranking rule
and :mod:`.ports` for host port allocation.
"""

from .core import DEFAULT_DYNAMIC_PORTS, schedule
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
    scalar_reason,
)
from .model import (
    Availability,
    Constraint,
    NodeInfo,
    Pending,
    Placement,
    Plan,
    PortRequest,
    Resources,
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
    "Pending",
    "Placement",
    "Plan",
    "PortRequest",
    "Resources",
    "TaskRequest",
    "constraint_reason",
    "scalar_reason",
    "schedule",
]
