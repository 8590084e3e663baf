"""``python -m berth.controller.offline_plan``: ``berth plan --cluster nodes.yaml`` without a
controller — a capacity-planning what-if over hypothetical nodes.

Input on stdin, one JSON object: ``{"request": <PlanRequest JSON>, "nodes": [<Node JSON>, ...]}``
(the CLI builds it from the YAML files). Output on stdout: the ``PlanResponse`` as JSON. The plan
comes from ``berth.controller.planning.preview``, the same code the live controller runs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from google.protobuf import json_format

from berth.controller.planning import Snapshot, preview
from berth.controller.store import Keys
from berth.controller.validation import SpecError, validate_spec
from berth.proto.berth.v1 import cluster_pb2
from berth.proto.berth.v1 import types_pb2 as pb


def run(document: dict[str, Any]) -> cluster_pb2.PlanResponse:
    request = json_format.ParseDict(document.get("request", {}), cluster_pb2.PlanRequest())
    nodes = {}
    for raw in document.get("nodes", []):
        node = json_format.ParseDict(raw, pb.Node())
        node.state = node.state or pb.NODE_STATE_READY
        node.availability = node.availability or pb.NODE_AVAILABILITY_ACTIVE
        nodes[node.id or node.name] = node
    names = set()
    for spec in request.specs:
        validate_spec(spec)
        if spec.name in names:  # the same rule as the live controller's plan
            raise SpecError("name", f"service {spec.name!r} appears twice in the plan")
        names.add(spec.name)
    snap = Snapshot(services={}, tasks={}, nodes=nodes)
    return preview(snap, list(request.specs), now=time.time(), task_key=Keys().task)


def main() -> None:
    try:
        response = run(json.load(sys.stdin))
    except SpecError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(2)
    except (json.JSONDecodeError, json_format.ParseError) as exc:
        print(json.dumps({"error": f"bad planner input: {exc}"}))
        sys.exit(2)
    print(json_format.MessageToJson(response, indent=None))


if __name__ == "__main__":
    main()
