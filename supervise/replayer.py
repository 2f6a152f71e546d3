"""Follower side: drive the local copy of the server with the committed inputs, in log order.

Each logged connection gets a real local TCP connection to the server. A DATA entry is written
and then waited on until the tracer (observe mode) has seen the server's reads return all of
its bytes, so the server consumes inputs in log order across connections. Replies are read and
dropped by the same thread every few inputs (no thread wakes up for each reply); their digests
come from the tracer's output events. With ``serialize`` (a multi-threaded server whose leader's
tracer lets one input go at a time: tracer/serial.py) the next input waits, beyond that, until
the thread that read this one has gone to sleep, as the leader's tracer waited. Far behind, it
polls for both instead of waiting for the tracer's reports (supervise/catch_up.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from tracer.events import ACCEPTS, CLOSES, READS, Call, Direction, SocketEvent
from tracer.serial import SERIAL_TIMEOUT

from .borrowed_socket import borrow_socket
from .catch_up import CatchUp
from .entries import Entry, Kind

log = logging.getLogger("supervise.replayer")

CONSUME_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
CONNECT_TIMEOUT = 10.0
# While it waits for the server, the delivery thread reads replies this often: a server blocked
# writing a reply that nobody reads would never consume its next input.
DRAIN_EVERY = 0.02
# Between inputs, replies are read on every DRAIN_INPUTS-th input: they wait in the socket
# buffers meanwhile, and one pass reads them all.
DRAIN_INPUTS = 16
REPLY_BUFFER = 1 << 16


@dataclass
class ReplayConn:
    cid: tuple[int, int]
    sock: socket.socket
    peer: str
    server_conn: int = 0
    sent: int = 0
    consumed: int = 0  # bytes the tracer saw the server read
    read_seen: int = 0  # bytes the delivery thread saw the server had read (server_sock)
    server_sock: socket.socket | None = None  # the server's end, borrowed
    eof_seen: bool = False
    server_closed: bool = False
    reader: int = 0  # the thread that made the server's last read of it, and that read's seq
    read_seq: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def close_sockets(self) -> None:
        self.sock.close()
        if self.server_sock is not None:
            self.server_sock.close()


def _address(sockaddr: tuple) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) as the tracer gives a peer."""
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Replayer(CatchUp):
    """Applies CONNECT, DATA and CLOSE entries to the local server.

    ``apply`` runs on the consensus delivery thread; ``on_server_event`` on the tracer thread.
    ``on_output(cid, data, length)`` receives what the server wrote on a replayed connection.
    """

    def __init__(self, server_host: str, server_port: int, on_output, on_stray,
                 serialize: bool = False) -> None:
        self.server = (server_host, server_port)
        self._family = socket.AF_INET6 if ":" in server_host else socket.AF_INET
        self.on_output = on_output
        self.on_stray = on_stray
        self.conns: dict[tuple[int, int], ReplayConn] = {}
        self._by_peer: dict[str, ReplayConn] = {}
        self._by_server_conn: dict[int, ReplayConn] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._running = True
        self.applied = 0
        self._sends = 0
        self._abandoned = False
        self.serialize = serialize
        self._slept: dict[int, int] = {}  # tid -> seq of its last sleep after input
        self._sleeps = threading.Condition()
        self.serial_timeouts = 0  # inputs sent on before the thread that read the last one slept

    # ---- entries (delivery thread) ------------------------------------------------------------

    def apply(self, entry: Entry, catching_up: bool = False) -> None:
        """Apply one committed entry; ``catching_up``: more wait behind it (see CONSUME_SPIN)."""
        if entry.kind is Kind.CONNECT:
            self._connect(entry.cid)
        elif entry.kind is Kind.DATA:
            conn = self.conns.get(entry.cid)
            if conn is None:
                log.warning("DATA for unknown connection %s: skipped", entry.cid)
                return
            self._send(conn, entry.data, catching_up)
        elif entry.kind is Kind.CLOSE:
            conn = self.conns.pop(entry.cid, None)
            if conn is not None:
                self._close(conn)
        self.applied += 1

    def abandon(self) -> None:
        """Stop waiting on the server (it exited, or this node is leaving): a wait in progress
        returns now and later entries are skipped, so shutdown is not held up by timeouts."""
        self._abandoned = True
        for conn in list(self.conns.values()):
            with conn.cond:
                conn.server_closed = True
                conn.cond.notify_all()

    def open_connections(self) -> list[tuple[int, int]]:
        return list(self.conns)

    def _connect(self, cid: tuple[int, int]) -> None:
        conn = ReplayConn(cid, socket.socket(self._family), "")
        with self._lock:
            self.conns[cid] = conn
        if self._abandoned:
            conn.server_closed = True
            return
        try:
            self._open(conn)
        except OSError as exc:
            log.error("replay: cannot connect to the server at %s:%d: %s", *self.server, exc)
            conn.server_closed = True
            return
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _open(self, conn: ReplayConn) -> None:
        """Connect ``conn`` to the server. The source port is left to connect(), which picks one
        free toward this destination, whatever waits out TIME_WAIT toward others: bind() takes
        only a port free toward every destination, and a few thousand short connections in a
        minute left none. When none is free even toward the server (EADDRNOTAVAIL), connect is
        retried, as ports leave TIME_WAIT, for up to CONNECT_TIMEOUT."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        pause = 0.001
        while True:
            sock = conn.sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.server[0], 0))
            sock.setblocking(False)
            # The tracer thread knows the server's accept of this connection by our address,
            # which exists once connect has picked the port: it waits on the lock until then.
            with self._lock:
                error = sock.connect_ex(self.server)
                if error in (0, errno.EINPROGRESS):
                    conn.peer = _address(sock.getsockname())
                    self._by_peer[conn.peer] = conn
                    break
            if error != errno.EADDRNOTAVAIL or time.monotonic() + pause > deadline:
                raise OSError(error, os.strerror(error))
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
            sock.close()
            conn.sock = socket.socket(self._family)
        if error == errno.EINPROGRESS:
            writable = select.poll()
            writable.register(conn.sock, select.POLLOUT)
            if not writable.poll(CONNECT_TIMEOUT * 1000):
                raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))

    def _send(self, conn: ReplayConn, data: bytes, spin: bool) -> None:
        if conn.server_closed:
            if not self._abandoned:
                log.warning("replay: %d input bytes for connection %s dropped: the server closed it",
                            len(data), conn.cid)
            return
        self._sends += 1
        if self._sends % DRAIN_INPUTS == 0:
            self._drain_replies()
        tally = self._tally() if spin and self.serialize and self._tally is not None else None
        try:
            self._write(conn.sock, data)
        except OSError as exc:
            log.warning("replay: connection %s to the server failed: %s", conn.cid, exc)
            conn.server_closed = True
            return
        conn.sent += len(data)
        if spin and not self.serialize and self._spin_until_read(conn):
            return
        if tally is not None and self._spin_until_finished(tally[0] + len(data)):
            return
        self._wait(conn, lambda: max(conn.consumed, conn.read_seen) >= conn.sent, CONSUME_TIMEOUT,
                   "consume")
        if self.serialize:
            self._wait_finished(conn)

    def _write(self, sock: socket.socket, data: bytes) -> None:
        """Send all of ``data``, reading replies whenever the socket is full: a server that is
        blocked writing a reply to another of our connections reads nothing until it is read."""
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                writable = select.poll()
                writable.register(sock, select.POLLOUT)
                writable.poll(DRAIN_EVERY * 1000)
                self._drain_replies()

    def _close(self, conn: ReplayConn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not conn.server_closed:
            self._wait(conn, lambda: conn.eof_seen, CLOSE_TIMEOUT, "see the end of")
            if self.serialize:
                self._wait_finished(conn)
        self._read_replies(conn.sock)  # a socket closed with unread data sends a reset, not a FIN
        with self._lock:
            self._by_peer.pop(conn.peer, None)
            self._by_server_conn.pop(conn.server_conn, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.close_sockets()

    def _wait_finished(self, conn: ReplayConn) -> None:
        """Wait until the thread that made the server's last read of ``conn`` has slept since."""
        reader, seq = conn.reader, conn.read_seq
        if reader and not self._wait(conn, lambda: self._slept.get(reader, 0) > seq,
                                     SERIAL_TIMEOUT, "finish with", self._sleeps):
            self.serial_timeouts += 1

    def _wait(self, conn: ReplayConn, done, timeout: float, what: str,
              cond: threading.Condition | None = None) -> bool:
        """Wait for ``done()``, which ``cond`` (the connection's by default) is notified of;
        False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        cond = cond or conn.cond

        def finished() -> bool:
            return done() or conn.server_closed

        while True:
            left = deadline - time.monotonic()
            with cond:
                if cond.wait_for(finished, min(max(left, 0), DRAIN_EVERY)):
                    return True
            if left <= 0:
                log.warning("replay: the server did not %s input on connection %s within %.1fs",
                            what, conn.cid, timeout)
                return False
            self._drain_replies()

    # ---- the local server, as the tracer sees it (tracer thread) ------------------------------

    def on_server_event(self, event: SocketEvent) -> bool:
        """Account for an event of the local server; False when it is not on a replayed connection."""
        if event.call is Call.SLEEP:
            with self._sleeps:
                self._slept[event.tid] = event.seq
                self._sleeps.notify_all()
            return False
        if event.call in ACCEPTS:
            with self._lock:
                conn = self._by_peer.get(event.peer or "")
                if conn is not None:
                    conn.server_conn = event.conn
                    self._by_server_conn[event.conn] = conn
            if conn is None:
                self.on_stray(event)
                return False
            conn.server_sock = self._server_end(event, conn.peer)
            if conn.cid not in self.conns and conn.server_sock is not None:  # closed meanwhile
                conn.server_sock.close()
            return True
        conn = self._by_server_conn.get(event.conn)
        if conn is None:
            if event.call in READS and event.ret > 0:
                self.on_stray(event)  # input the log does not hold
            return False
        if event.dir is Direction.OUT:
            self.on_output(conn.cid, event.data, event.ret)
        elif event.call in READS:
            with conn.cond:
                if event.ret > 0:
                    conn.consumed += event.ret
                else:
                    conn.eof_seen = True
                conn.reader, conn.read_seq = event.tid, event.seq
                conn.cond.notify_all()
        elif event.call in CLOSES and event.last:
            with conn.cond:
                conn.server_closed = True
                conn.cond.notify_all()
        return True

    @staticmethod
    def _server_end(event: SocketEvent, peer: str) -> socket.socket | None:
        """The server's socket of a replayed connection, unless its descriptor already names
        another connection (the server closed it and accepted again before this event was read)."""
        sock = borrow_socket(event.pid, event.ret)
        if sock is None:
            return None
        try:
            if _address(sock.getpeername()) == peer:
                return sock
        except OSError:
            pass
        sock.close()
        return None

    # ---- replies --------------------------------------------------------------------------------

    def _drain_replies(self) -> None:
        """Read and drop whatever the server has replied on any replayed connection. A read that
        does not fill the buffer took all there was; more is read on a later pass."""
        if not self._running:
            return
        for key, _ in self._selector.select(0):
            if not self._read_replies(key.fileobj):
                try:
                    self._selector.unregister(key.fileobj)
                except (KeyError, ValueError):
                    pass

    @staticmethod
    def _read_replies(sock: socket.socket) -> bool:
        """Read and drop what waits on one replayed connection; False once the server closed it."""
        while True:
            try:
                data = sock.recv(REPLY_BUFFER)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            if len(data) < REPLY_BUFFER:
                return True

    def close(self) -> None:
        self._running = False
        for conn in list(self.conns.values()):
            conn.close_sockets()
        self.conns.clear()
        self._selector.close()
