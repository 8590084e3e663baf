"""The container spec saved with each bundle (``berth.json``), read back by a restarted agent."""

from __future__ import annotations

from berth.agent.runc import _spec_from_json, _spec_to_json
from berth.agent.runtime import ContainerSpec, PortBinding


def test_a_spec_survives_the_round_trip() -> None:
    spec = ContainerSpec(
        task_id="db.1.a",
        service="db",
        slot=1,
        node_name="h1",
        image="postgres:16",
        args=("postgres", "-c", "fsync=off"),
        env={"A": "1"},
        cpu_millis=500,
        memory_bytes=64 << 20,
        network="host",
        ports=(PortBinding(container_port=5432, host_port=30000, protocol="tcp"),),
        at_most_one=True,
    )
    assert _spec_from_json(_spec_to_json(spec)) == spec
    assert (
        _spec_from_json(_spec_to_json(ContainerSpec(**{**_fields(spec), "at_most_one": False}))).at_most_one
        is False
    )


def test_a_bundle_saved_before_at_most_one_was_recorded_counts_as_at_most_one() -> None:
    """Not known, so the watchdog of an agent restarted while cut off stops it rather than risk
    a second copy."""
    saved = _spec_to_json(ContainerSpec(task_id="x.1.a", service="x", slot=1, node_name="h1", image="i"))
    del saved["at_most_one"]
    assert _spec_from_json(saved).at_most_one is True


def _fields(spec: ContainerSpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in ContainerSpec.__dataclass_fields__}
