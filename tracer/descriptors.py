"""Which descriptors hold each tracked connection, across dup and fork.

The probes give a connection one conn id, shared by every descriptor of its socket: a dup, or a
forked child's copy. The connection ends with its last descriptor, not with the first close: a
forking server's parent closes its copy of each client's socket as soon as the child has one,
and the child may then end the connection by exiting, with no close at all.
"""

from __future__ import annotations

Holder = tuple[int, int]  # (tgid, fd)


class Descriptors:
    """Kept by the tracer thread from the events it reads and the processes it follows."""

    def __init__(self) -> None:
        self._conn_of: dict[Holder, int] = {}
        self._holders: dict[int, set[Holder]] = {}

    def opened(self, tgid: int, fd: int, conn: int) -> None:
        """``fd`` of ``tgid`` names connection ``conn`` from now on."""
        key = (tgid, fd)
        if self._conn_of.get(key) == conn:
            return
        self._forget(key)
        self._conn_of[key] = conn
        self._holders.setdefault(conn, set()).add(key)

    def closed(self, tgid: int, fd: int, conn: int) -> bool:
        """``fd`` of ``tgid`` no longer names ``conn``; True when no other descriptor holds it
        (also when this one was never seen: its events were lost, or it predates the tracer)."""
        if self._conn_of.get((tgid, fd)) == conn:
            self._forget((tgid, fd))
        return conn not in self._holders

    def held_by(self, tgid: int) -> list[tuple[int, int]]:
        """(fd, conn) of each descriptor ``tgid`` holds."""
        return [(fd, conn) for (t, fd), conn in self._conn_of.items() if t == tgid]

    def _forget(self, key: Holder) -> None:
        conn = self._conn_of.pop(key, None)
        if conn is None:
            return
        holders = self._holders[conn]
        holders.discard(key)
        if not holders:
            del self._holders[conn]
