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


class LogWriteError(Exception):
    """The log's directory refused a write or an fsync (full, read-only, failing disk). The log
    store stops writing from then on: after a failed write or fsync, what the file holds is not
    known, so the replica must stop as if it had crashed; its log reopens at restart, a torn
    tail cut off."""

    def __init__(self, directory: object, cause: OSError) -> None:
        super().__init__(f"cannot write the log in {directory}: {cause.strerror or cause}")
        self.directory = directory
        self.errno = cause.errno


class LogDirInUse(Exception):
    """Another process holds the log's directory: two replicas on one log would corrupt it."""

    def __init__(self, directory: object, holder: str) -> None:
        by = f" (pid {holder})" if holder.isdigit() else ""
        super().__init__(f"the log in {directory} is in use by another process{by}: each replica "
                         f"needs a data directory of its own")
        self.directory = directory
