"""The open agent streams: one outbound queue per connected node.

Sessions carry a token so a stale stream that closes after its agent already reconnected cannot
mark the node down or detach the new session.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from berth.proto.berth.v1 import agent_pb2


@dataclass(slots=True)
class Session:
    node_id: str
    token: int
    outbox: asyncio.Queue[agent_pb2.ControllerMessage] = field(default_factory=asyncio.Queue)


class AgentHub:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._tokens = itertools.count(1)

    def attach(self, node_id: str) -> Session:
        session = Session(node_id=node_id, token=next(self._tokens))
        self._sessions[node_id] = session
        return session

    def detach(self, session: Session) -> bool:
        """Forget the session if it is still the current one; True if it was."""
        current = self._sessions.get(session.node_id)
        if current is not None and current.token == session.token:
            del self._sessions[session.node_id]
            return True
        return False

    def is_current(self, session: Session) -> bool:
        current = self._sessions.get(session.node_id)
        return current is not None and current.token == session.token

    def connected(self, node_id: str) -> bool:
        return node_id in self._sessions

    def send(self, node_id: str, message: agent_pb2.ControllerMessage) -> bool:
        session = self._sessions.get(node_id)
        if session is None:
            return False
        session.outbox.put_nowait(message)
        return True
