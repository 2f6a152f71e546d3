"""Which connection each event belongs to, and when a connection ends: its peer, the descriptors
that name it in every traced process (across dup, fork and exec), and closes made without a close
call (by exec or exit).

A mixin of ``Tracer`` (tracer/tracer.py), like tasks.py: these methods run on the tracer thread.
"""

from __future__ import annotations

import struct
import time

from . import procfs
from .descriptors import Descriptors
from .events import ACCEPTS, CLOSES, DUPS, Call, Direction, SocketEvent
from .tasks import Task

_RANGE_SLOT = struct.Struct("=Qi4x")  # an fd number close_range closed (bpf/sockets.c)


class ConnectionTracking:
    """Peers and descriptors of the traced processes' connections."""

    def _init_connections(self) -> None:
        self._peers: dict[int, str] = {}
        self._descriptors = Descriptors()
        self._gone: list[tuple[int, list[tuple[int, int]] | None]] = []  # see _descriptors_gone

    def _track_connection(self, event: SocketEvent) -> None:
        if event.call in ACCEPTS:
            if event.peer is None:
                event.peer = procfs.peer_of(event.pid, event.fd)
            if event.peer:
                self._peers[event.conn] = event.peer
            self._descriptors.opened(event.pid, event.ret, event.conn)
        elif event.call is Call.LISTEN:
            self._check_listener(event)
        else:
            event.peer = self._peers.get(event.conn)
            if not event.conn:
                return  # a listening socket
            if event.call in DUPS:
                self._descriptors.opened(event.pid, event.fd, event.conn)
            elif event.call in CLOSES:
                event.last = self._descriptors.closed(event.pid, event.fd, event.conn)
                if event.last:
                    self._peers.pop(event.conn, None)

    def _on_close_range(self, event: SocketEvent, thread: Task | None) -> None:
        """close_range(first, last) returned. The probe took the sockets among the range's
        first fd numbers out of the map, with a (conn, fd) slot in the range record's data for
        each number it looked at (``ret`` of them; conn 0: no connection). ``buf``, when not 0,
        is the first number it did not look at: the rest of the range leaves the map here (in a
        holding mode the probe stopped the thread for it, so that no descriptor it opens next
        under one of those numbers is taken for a socket; it goes on now). Each connection's
        descriptor is reported as closed by the calling thread."""
        slots = _RANGE_SLOT.iter_unpack(event.data[:event.ret * _RANGE_SLOT.size])
        closed = [(conn, fd) for conn, fd in slots if conn]
        if event.buf:
            assert self.probes is not None
            closed += self.probes.close_range(event.pid, event.buf, event.count)
        for conn, fd in closed:
            self._handle(SocketEvent(event.seq, event.t, event.pid, event.tid, Call.CLOSE_RANGE,
                                     fd, 0, conn, Direction.CTL, False, False))
        if event.stopped and thread is not None:  # let it go as a held input released at once
            event.released = True
            thread.pending = event
            if thread.gate_stopped:
                thread.gate_stopped = False
                self._on_gate_stop(thread)
            else:
                self._await_gate_stop(thread)

    def _descriptors_gone(self, tgid: int, fds: list[tuple[int, int]] | None) -> None:
        """Descriptors that went without a close call: ``fds`` (fd, conn) closed by exec, or
        (None) all that the exited process ``tgid`` held. Each is reported as a close by no
        thread (tid 0), which may end its connection, after the events read from the ring next:
        the process's events from before are among them (a dup2 before exec, say), and handling
        them from here, between two events of a batch, would reorder events."""
        self._gone.append((tgid, fds))

    def _report_gone(self, gone: list[tuple[int, list[tuple[int, int]] | None]]) -> None:
        for tgid, fds in gone:
            closed = None if fds is None else set(fds)
            for fd, conn in self._descriptors.held_by(tgid):
                if closed is None or (fd, conn) in closed:
                    self._handle(SocketEvent(0, time.time(), tgid, 0, Call.CLOSE, fd, 0, conn,
                                             Direction.CTL, False, False))

    def _check_listener(self, event: SocketEvent) -> None:
        """listen() marks any socket; keep only TCP listeners."""
        assert self.probes is not None
        if event.fd not in procfs.tcp_fds(event.pid):
            self.probes.drop_socket(event.pid, event.fd)
