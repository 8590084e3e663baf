"""A small synchronous ClusterAPI client: one channel to ``BERTH_ADDR``, errors translated once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import grpc

from berth.cli.errors import ApiError
from berth.proto.berth.v1 import cluster_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:7070"
T = TypeVar("T")


def controller_address() -> str:
    return os.environ.get("BERTH_ADDR", DEFAULT_ADDR)


class Client:
    def __init__(self, address: str | None = None, timeout: float = 15.0) -> None:
        self.address = address or controller_address()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.address)
        self.stub = cluster_pb2_grpc.ClusterAPIStub(self._channel)

    def call(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or code.name
            # the controller's own UNAVAILABLE answers (etcd down) name etcd; anything else with that
            # code is gRPC failing to reach the controller at all
            transport = any(
                m in details.lower() for m in ("failed to connect", "connection refused", "socket closed")
            )
            if code == grpc.StatusCode.UNAVAILABLE and transport and not details.startswith("etcd"):
                raise ApiError(
                    f"cannot reach the controller at {self.address} "
                    "(set BERTH_ADDR, or start one with `berth dev up`)"
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ApiError(
                    f"the controller at {self.address} did not answer within {self.timeout:.0f}s"
                ) from None
            raise ApiError(" ".join(details.split())) from None

    def close(self) -> None:
        self._channel.close()
