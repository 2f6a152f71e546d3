"""What a leading node proposes for its server's socket events: CONNECT for a client accepted on a
listening socket, DATA for its input (in entries of at most MAX_CHUNK bytes), CLOSE for its end,
and DIGEST of what the server wrote to it. A held input is released when its entry commits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from consensus import CommitFuture, Replica
from tracer.events import ACCEPTS, CLOSES, READS, Direction, SocketEvent
from tracer.procfs import socket_inode

from .digest import OutputChecker
from .entries import Entry, Kind
from .metrics import NodeMetrics
from .own_conns import OwnConn, OwnConnections

log = logging.getLogger("supervise")

MAX_CHUNK = 1 << 20  # one read becomes several entries; the last one's commit releases it


class LeaderInputs:
    """Runs on the tracer thread while the node leads (``on_event``), and on the node's digest
    thread (``propose_digests``)."""

    def __init__(self, replica: Replica, own: OwnConnections, checker: OutputChecker,
                 metrics: NodeMetrics, listen_fds: set[int],
                 release: Callable[[SocketEvent], None]) -> None:
        self.replica = replica
        self.own = own
        self.checker = checker
        self.metrics = metrics
        self.listen_fds = listen_fds
        self._release_event = release
        self._digested: dict[tuple[int, int], int] = {}

    def on_event(self, ev: SocketEvent, own: OwnConn | None, epoch: int) -> None:
        """``ev`` is an accept, or an event on ``own``, a connection of this leadership."""
        if ev.call in ACCEPTS:
            if ev.fd not in self.listen_fds:
                self._release(ev, None)
                return
            # the accepting thread is held: ev.ret names the new socket until it goes on
            own = self.own.accepted((epoch, ev.conn), ev.conn, ev.ret, socket_inode(ev.pid, ev.ret))
            self._propose(own, Entry(Kind.CONNECT, *own.cid), ev)
            return
        assert own is not None
        cid = own.cid
        if ev.dir is Direction.OUT:
            self.checker.output(cid, ev.data, ev.ret, checked=False)
            self.metrics.output_bytes.inc(ev.ret)
        elif ev.call in READS and ev.input:
            if ev.ret > 0:
                self.metrics.input_bytes.inc(ev.ret)
                for start in range(0, len(ev.data) - MAX_CHUNK, MAX_CHUNK):
                    self._propose(own, Entry(Kind.DATA, *cid, ev.data[start:start + MAX_CHUNK]), None)
                last = (len(ev.data) - 1) // MAX_CHUNK * MAX_CHUNK
                self._propose(own, Entry(Kind.DATA, *cid, ev.data[last:]), ev)
            else:
                self._close(own)
                self._propose(own, Entry(Kind.CLOSE, *cid), ev)
        elif ev.call in CLOSES and ev.last:
            self._close(own)
            self._propose(own, Entry(Kind.CLOSE, *cid), None)

    def propose_digests(self, epoch: int) -> None:
        """Digest every open connection's output so far, where it grew since the last time."""
        for cid in self.own.open_cids(epoch):
            offset, crc = self.checker.digest(cid)
            if offset and self._digested.get(cid) != offset:
                self._digested[cid] = offset
                self.replica.propose(Entry(Kind.DIGEST, *cid, offset=offset, crc=crc).encode())

    def _close(self, own: OwnConn) -> None:
        own.closing = True
        cid = own.cid
        offset, crc = self.checker.digest(cid)
        if offset and self._digested.get(cid) != offset:
            self.replica.propose(Entry(Kind.DIGEST, *cid, offset=offset, crc=crc).encode())
        self._digested.pop(cid, None)  # the stream itself goes when the CLOSE commits (node.py)

    def _propose(self, own: OwnConn, entry: Entry, ev: SocketEvent | None) -> None:
        """Propose an entry of an own connection; the commit of ``ev``'s entry releases it."""
        held = ev if ev is not None and ev.gated else None
        payload = entry.encode()
        self.own.proposed(own, payload, held)  # first: the commit may be delivered before propose returns
        future = self.replica.propose(payload, defer=True)  # appended with its batch (node.py)
        if held is not None:
            future.add_done_callback(lambda f, ev=held: self._release(ev, f))

    def _release(self, ev: SocketEvent, future: CommitFuture | None) -> None:
        if future is not None and future.exception() is not None:
            log.warning("input on connection %d not committed (%s): held until the log decides it",
                        ev.conn, future.exception())
            return
        self._release_event(ev)
        held, hold_time = self.metrics.call(ev.call.syscall)
        held.inc()
        hold_time.observe(max(0.0, time.time() - ev.t))
