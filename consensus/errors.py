"""Exceptions of the consensus API."""

from __future__ import annotations


class NotLeader(Exception):
    """This replica cannot take proposals; ``leader`` names the leader when it is known."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class LeadershipLost(NotLeader):
    """Leadership ended while the proposal was in flight: it may or may not commit later."""


class ReplicaClosed(Exception):
    """The replica was closed."""
