"""The agent's ``--resource NAME=AMOUNT`` option: named resources it offers besides cpu and memory."""

from __future__ import annotations

import pytest
import typer

from berth.agent.__main__ import parse_resources


def test_named_resources_are_parsed_with_units() -> None:
    assert parse_resources(["gpu=2", "disk=100Gi"]) == {"gpu": 2, "disk": 100 << 30}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("gpu", "is not NAME=AMOUNT"),
        ("=2", "is not NAME=AMOUNT"),
        ("cpu=4", "cpu is measured on the host (--cpus"),
        ("memory=8Gi", "memory is measured on the host"),
    ],
)
def test_bad_resources_are_refused_with_the_fix(item: str, message: str) -> None:
    with pytest.raises(typer.BadParameter) as caught:
        parse_resources([item])
    assert message in str(caught.value)
