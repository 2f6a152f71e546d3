"""The connections a node's own server accepted while the node led, and how a node that stops
leading keeps its copy of the server.

A leader's server consumes only committed input: each input's thread is held until its entry
commits. So when leadership ends, the copy is the log's up to the proposals still in flight,
whose threads are still held. The log decides them: a proposal may yet commit (a new leader's log
holds it before anything of its own) or never. The node keeps those threads held and goes on
delivering the log. An own entry that commits releases the input it carried. The first entry of
a later leadership settles the rest: nothing of ours can commit after it, so every input still
held is refused (its syscall fails with ECONNRESET and the server drops the connection) and every
own connection is shut down, which is what the next entries (that leader's CLOSE for each of
them) do on every other copy. Then the copy is the log's again and the node follows.

Clients that connected while the node led but that the server had not accepted yet (its thread
was held) wait in the listening socket's backlog; the server must not serve them as a follower,
and for Redis merely accepting one changes the copy (connection ids show in replies). So the
node takes them out of the backlog itself and resets them. An accept the log does not hold (held
meanwhile, or one whose CONNECT was proposed but never committed) is refused with EAGAIN: the
server never learns of that connection (the tracer has the held thread close the descriptor
before it goes on). Letting such an accept through would change the copy as surely as input
would.

With cluster.hold = "outputs" the server consumed the inputs in flight already, and only its
outputs wait: if the log does not take one of them, refusing it is an escape, and the node leaves
the service.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tracer import procfs
from tracer.events import ACCEPTS, CLOSES, READS, SocketEvent

from .borrowed_socket import borrow_socket
from .entries import Entry, Kind

log = logging.getLogger("supervise")

SETTLE_CLOSE_TIMEOUT = 2.0

Cid = tuple[int, int]


@dataclass(eq=False)
class OwnConn:
    cid: Cid
    conn: int
    fd: int
    inode: int | None  # of the server's socket: the fd number may name another file later
    closing: bool = False  # its CLOSE is proposed: later events on it are not logged
    server_closed: bool = False
    never_accepted: bool = False  # its accept was refused: the server never knew it
    # proposals not yet delivered, each with the held input its commit releases
    inflight: deque[tuple[bytes, SocketEvent | None]] = field(default_factory=deque)
    unlogged: list[SocketEvent] = field(default_factory=list)  # held after leadership ended


class OwnConnections:
    """Bookkeeping for the node: ``accepted`` and ``proposed`` on the tracer thread while leading,
    ``delivered`` and ``settle`` on the delivery thread, ``on_event`` on the tracer thread after
    leadership ended. ``release`` and ``refuse`` hand a held input back to the tracer; ``refuse``
    of an accept also shuts the accepted socket down."""

    def __init__(self, release: Callable[[SocketEvent], None],
                 refuse: Callable[[SocketEvent, int], None]) -> None:
        self._release = release
        self._refuse = refuse
        self._lock = threading.Lock()
        self._closed = threading.Condition(self._lock)
        self.by_conn: dict[int, OwnConn] = {}
        self.by_cid: dict[Cid, OwnConn] = {}
        self.epochs: set[int] = set()
        self.deposed: int | None = None  # the epoch whose leadership ended, until settled
        self.orphans: set[Cid] = set()  # shut down here before any CLOSE for them committed
        self._held_accepts: list[SocketEvent] = []

    # ---- while leading (tracer thread) ---------------------------------------------------------

    def accepted(self, cid: Cid, conn: int, fd: int, inode: int | None) -> OwnConn:
        own = OwnConn(cid, conn, fd, inode)
        with self._lock:
            self.epochs.add(cid[0])
            self.by_conn[conn] = own
            self.by_cid[cid] = own
        return own

    def proposed(self, own: OwnConn, payload: bytes, held: SocketEvent | None) -> None:
        with self._lock:
            own.inflight.append((payload, held))

    def open_cids(self, epoch: int) -> list[Cid]:
        with self._lock:
            return [o.cid for o in self.by_conn.values() if o.cid[0] == epoch and not o.closing]

    def open_count(self) -> int:
        return sum(1 for o in list(self.by_conn.values()) if not o.closing)

    # ---- the log (delivery thread) --------------------------------------------------------------

    def ends_leadership(self, entry: Entry) -> bool:
        """True when ``entry`` comes from a leadership later than the one that ended: after it,
        nothing this node proposed can commit."""
        return self.deposed is not None and entry.epoch > self.deposed

    def delivered(self, payload: bytes, entry: Entry) -> bool:
        """Account for a committed entry of an own connection; False when it is not one."""
        if entry.epoch not in self.epochs:
            return False
        if entry.kind is Kind.DIGEST:
            return True  # this node's own output, checked against itself
        with self._lock:
            own = self.by_cid.get(entry.cid)
            if own is None:
                if entry.kind is Kind.CLOSE:
                    self.orphans.discard(entry.cid)
                    return True
                raise LostInput(f"entry for connection {entry.cid} committed after this node "
                                "refused its input")
            held = None
            while own.inflight:
                sent, event = own.inflight.popleft()
                if sent == payload:
                    held = event
                    break
            else:
                raise LostInput(f"committed entry for connection {entry.cid} was never proposed here")
            if entry.kind is Kind.CLOSE:
                self._forget(own)
        if held is not None and not held.released and self.deposed is not None:
            self._release(held)  # while leading its commit future releases it
        return True

    def depose(self, epoch: int) -> int:
        """Leadership ``epoch`` ended; returns how many inputs stay held until the log decides."""
        with self._lock:
            self.deposed = epoch
            return sum(1 for own in self.by_conn.values() for _, ev in own.inflight
                       if ev is not None and not ev.released)

    def settle(self, server_pid: int, listen_fds: set[int]) -> int:
        """Nothing of ours can commit any more: reset the clients still in the backlog, refuse
        what is held, shut every own connection down and wait (bounded) until the server has
        closed them. Returns how many closed."""
        reset = sum(reset_backlog(server_pid, fd) for fd in sorted(listen_fds))
        with self._lock:
            owns = list(self.by_conn.values())
            accepts, self._held_accepts = self._held_accepts, []
            self.deposed = None
            for ev in accepts:
                self._turn_away(ev)
            for own in owns:
                for ev in self._held(own):
                    if ev.call in ACCEPTS:  # its CONNECT never committed: the server never learns of it
                        own.server_closed = own.never_accepted = True
                    self._turn_away(ev)
                own.unlogged.clear()
                own.inflight.clear()
        if reset or accepts:
            log.info("reset %d clients that connected while this node led but were not accepted yet",
                     reset + len(accepts))
        for own in owns:
            if not own.server_closed and own.inode is not None:
                # its close may still be on its way: the number may name another file by now
                shut_down_socket(server_pid, own.fd, own.inode)
        deadline = time.monotonic() + SETTLE_CLOSE_TIMEOUT
        with self._lock:
            while not all(o.server_closed for o in owns) and time.monotonic() < deadline:
                self._closed.wait(0.05)
            open_ = [o.cid for o in owns if not o.server_closed]
            for own in owns:
                if not own.never_accepted:
                    self.orphans.add(own.cid)
                self._forget(own)
        if open_:
            log.warning("the server kept %d connections of the old leadership open after they were "
                        "shut down: %s", len(open_), open_)
        return len(owns) - len(open_)

    def executed_unlogged(self) -> int:
        """Proposals of inputs the server went on with before their commit (outputs held), not
        yet delivered: if leadership ended now, the log might never take them."""
        with self._lock:
            return sum(1 for o in self.by_conn.values() for _, held in o.inflight if held is None)

    @property
    def unsettled(self) -> bool:
        return self.deposed is not None and bool(self.by_conn)

    # ---- after leadership ended (tracer thread) -------------------------------------------------

    def on_event(self, ev: SocketEvent) -> bool:
        """Handle an event on an own connection while not leading, and hold the server's accepts
        until the log moved on; False when it is neither."""
        if not self.by_conn and self.deposed is None:
            return False  # the usual case, without the lock: nothing of a leadership is left
        with self._lock:
            own = self.by_conn.get(ev.conn)
            if own is None:
                if ev.gated and ev.call in ACCEPTS and self.deposed is not None:
                    self._held_accepts.append(ev)
                    return True
                return False
            if ev.call in CLOSES and ev.last:
                own.server_closed = True
                self._closed.notify_all()
            if not ev.gated:
                return True
            if self.deposed is not None:
                own.unlogged.append(ev)
                return True
        self._turn_away(ev)
        return True

    # ---- internals ------------------------------------------------------------------------------

    def _turn_away(self, ev: SocketEvent) -> None:
        """What the log will not hold is refused, input or a connection; an end of input is let
        through."""
        if ev.call in ACCEPTS:
            self._refuse(ev, errno.EAGAIN)
        elif ev.call in READS and ev.ret > 0:
            self._refuse(ev, errno.ECONNRESET)
        else:
            self._release(ev)

    def _held(self, own: OwnConn) -> Iterator[SocketEvent]:
        for _, ev in own.inflight:
            if ev is not None and not ev.released:
                yield ev
        yield from own.unlogged

    def _forget(self, own: OwnConn) -> None:
        self.by_cid.pop(own.cid, None)
        if self.by_conn.get(own.conn) is own:
            del self.by_conn[own.conn]


class LostInput(RuntimeError):
    """The log committed an input that this node's copy was not given: the copy is not the log's."""


def shut_down_socket(pid: int, fd: int, inode: int | None = None) -> None:
    """shutdown(SHUT_RDWR) a socket of another process: the server reads EOF and closes it, and
    the client sees the end. Given ``inode``, only while ``fd`` still names that socket, or else
    where a process the server forked holds it (a forking server's parent closes its copy)."""
    sock = borrow_socket(pid, fd, inode)
    if sock is None and inode is not None:
        sock = next((borrow_socket(child, child_fd, inode)
                     for child, child_fd in procfs.socket_holders(pid, inode)), None)
    if sock is None:
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut down or reset


def reset_backlog(pid: int, fd: int) -> int:
    """Accept every connection waiting on another process's listening socket and reset it;
    returns how many. The socket is made non-blocking only for the while, if it was not."""
    sock = borrow_socket(pid, fd)
    if sock is None:
        return 0
    reset = 0
    with sock:
        flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            while True:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("resetting the backlog of fd %d of the server (pid %d): %s", fd, pid,
                                exc.strerror)
                    break
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                reset += 1
        finally:
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags)
    return reset
