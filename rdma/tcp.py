"""The ``tcp`` provider: reliable-connected verbs in software over TCP, like siw.

A queue pair is two TCP connections, one per direction of requests (see tcp_qp.py): the
handshake's connection and a second one the listener side opens back to a one-shot port the
connector advertised in its MAC-protected parameters (with a 32-byte token, checked in constant
time). Frames are 32-byte headers (op, flags, status, imm, sequence number, address, rkey,
length) and payloads. The peer's responder thread places WRITE and SEND payloads straight into the
registered region (``recv_into`` the region's memory), answers READs, and acknowledges every
request *after* placing it, so a requester's completion means the bytes are in the remote region.
The requester reads its acknowledgements itself when it polls or waits on the send CQ (no thread
hop), and completes work requests in posting order. A NAK (bad rkey, out of bounds, missing access
right, no receive posted) completes that work request with the verbs status; the queue pair then
enters ERR, flushes the rest (WR_FLUSH_ERR) and closes its connections, so the peer's follows.

Peer death and partitions: EOF or a reset (a killed process's sockets are closed by its kernel)
moves the queue pair to ERR within one thread wakeup: outstanding work requests complete with
RETRY_EXC_ERR (the first) and WR_FLUSH_ERR, posted receives with WR_FLUSH_ERR. When the peer's
host becomes unreachable instead, TCP keepalive (1 s idle, 1 s interval, 3 probes) and
TCP_USER_TIMEOUT (4 s) bound the detection to about 5 s.

Fault injection for the layers above (``qp.faults = Faults(...)``, ``qp.cut()``), in RC terms:

* ``drop``: a request is lost on the wire. RC retransmits it after ``rto`` seconds; later
  requests wait behind it (go-back-N), so the requester only sees latency. If the same request is
  lost ``retry_cnt`` + 1 times in a row, it completes with RETRY_EXC_ERR and the queue pair enters
  ERR, as with an RNIC's transport retry counter.
* ``delay``: every request is held for a uniform random time in [0, delay) before it is sent.
* ``duplicate``: a request is delivered twice (a retransmission whose original was not lost).
  The responder recognises the repeated sequence number, does not execute it again and re-acks.
* ``cut()``: the connections break. Both queue pairs enter ERR; outstanding work requests
  complete with RETRY_EXC_ERR / WR_FLUSH_ERR. Consensus must survive every one of these.
"""

from __future__ import annotations

import hmac
import itertools
import mmap
import os
import random
import secrets
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics
from .softcq import SoftCQ, SoftMR, check_length
from .tcp_qp import TcpQP
from .verbs import Access, Context, MemoryRegion, ProtectionDomain, VerbsError, WorkCompletion

KEEPALIVE = (1, 1, 3)  # idle, interval, probes
USER_TIMEOUT_MS = 4000
CHANNEL_TIMEOUT = 5.0
SPIN = float(os.environ.get("RDMA_TCP_SPIN_US", "60")) * 1e-6  # busy-poll before epoll


@dataclass
class Faults:
    """Fault injection on one queue pair's outgoing requests (see the module docstring)."""

    drop: float = 0.0
    delay: float = 0.0
    duplicate: float = 0.0
    seed: int | None = None
    rto: float = 0.001
    retry_cnt: int = 7
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class TcpPD(ProtectionDomain):
    def __init__(self, ctx: TcpContext) -> None:
        self.ctx = ctx
        self.mrs: dict[int, SoftMR] = {}

    def reg_mr(self, length: int, access: Access) -> MemoryRegion:
        check_length(length)
        if access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC) and not access & Access.LOCAL_WRITE:
            raise VerbsError("REMOTE_WRITE/REMOTE_ATOMIC access requires LOCAL_WRITE (as ibv_reg_mr)")
        key = 0
        while key == 0 or key in self.mrs:
            key = secrets.randbits(32)
        mr = SoftMR(self, mmap.mmap(-1, length), length, access, key)
        self.mrs[key] = mr
        return mr

    def _dereg(self, mr: SoftMR) -> None:
        self.mrs.pop(mr.rkey, None)

    def close(self) -> None:
        for mr in list(self.mrs.values()):
            mr.close()


class TcpCQ(SoftCQ):
    """Waits in epoll on the request connections of its queue pairs (their acknowledgements)
    and on an eventfd that the responder threads signal (receive completions, flushes).

    ``wait`` does not drain before sleeping: epoll reports a connection with data at once, and
    only that queue pair's responses are parsed, so a round trip costs the same system calls as
    a plain ping-pong (send, epoll, recv).
    """

    def __init__(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._efd, select.EPOLLIN)
        self._drains: dict[int, Callable[[], None]] = {}
        super().__init__(mmap.mmap(-1, 4096), spin=SPIN)

    def add_fd(self, sock: socket.socket, drain: Callable[[], None]) -> None:
        fd = sock.fileno()
        self._drains[fd] = drain
        self._ep.register(fd, select.EPOLLIN)
        self.add_source(drain)

    def remove_fd(self, sock: socket.socket, drain: Callable[[], None]) -> None:
        self.remove_source(drain)
        fd = sock.fileno()
        if fd >= 0 and self._drains.get(fd) is drain:
            del self._drains[fd]
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _wake(self) -> None:
        os.eventfd_write(self._efd, 1)

    def _take(self, max_entries: int) -> list[WorkCompletion]:
        q = self._q
        if len(q) == 1:
            try:
                return [q.popleft()]
            except IndexError:
                return []
        out: list[WorkCompletion] = []
        try:
            while q and len(out) < max_entries:
                out.append(q.popleft())
        except IndexError:
            pass
        return out

    def wait(self, timeout: float | None = None, max_entries: int = 16,
             spin: float | None = None) -> list[WorkCompletion]:
        q = self._q
        if q:
            return self._take(max_entries)
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        # Busy-poll epoll (timeout 0) for a moment first: a reply usually comes within a round
        # trip, and sleeping and being woken costs more than that on a quiet machine.
        spin = self._spin if spin is None else spin
        spin_end = now + spin if spin else 0.0
        ep, drains, efd, lock = self._ep, self._drains, self._efd, self._sleep_lock
        while True:
            if spin_end and time.monotonic() < spin_end:
                events = ep.poll(0)
            else:
                # Count as a sleeper only around a blocking epoll: completions we push ourselves
                # while draining need no eventfd wakeup; one pushed by another thread before the
                # count went up is already in the queue.
                lock.acquire()
                self._sleepers += 1
                lock.release()
                try:
                    if q or self.closed:
                        return self._take(max_entries)
                    left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                    if left <= 0:
                        return self.poll(max_entries)
                    try:
                        events = ep.poll(left)
                    except (OSError, ValueError):
                        return self.poll(max_entries)
                finally:
                    lock.acquire()
                    self._sleepers -= 1
                    lock.release()
            for fd, _ in events:
                if fd == efd:
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        pass
                else:
                    drain = drains.get(fd)
                    if drain is not None:
                        drain()
            if q:
                return self._take(max_entries)

    def close(self) -> None:
        if not self.closed:
            super().close()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, intvl, cnt = KEEPALIVE
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.settimeout(None)


def _accept_channel(ls: socket.socket, token: bytes) -> socket.socket:
    """The listener side's connection back, proven by the token; strangers are dropped."""
    deadline = time.monotonic() + CHANNEL_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VerbsError("tcp: the peer did not open the second connection in time")
        ls.settimeout(left)
        try:
            conn, _ = ls.accept()
        except TimeoutError:
            continue
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            got = conn.recv(len(token), socket.MSG_WAITALL)
        except OSError:
            got = b""
        if hmac.compare_digest(got, token):
            return conn
        conn.close()


class TcpContext(Context):
    provider = "tcp"

    def __init__(self) -> None:
        self.stats = metrics.stats("tcp")
        self._qpn = itertools.count((os.getpid() * 4099 + 7) & 0xFFFF00)
        self._objs: list = []
        self.closed = False

    def alloc_pd(self) -> ProtectionDomain:
        pd = TcpPD(self)
        self._objs.append(pd)
        return pd

    def create_cq(self, depth: int = 1024) -> TcpCQ:
        cq = TcpCQ()
        self._objs.append(cq)
        return cq

    # -- hooks for cm.py ---------------------------------------------------------------------
    def _cm_prepare(self, pd: ProtectionDomain, send_cq: TcpCQ, recv_cq: TcpCQ) -> TcpQP:
        if not (isinstance(pd, TcpPD) and pd.ctx is self):
            raise VerbsError("protection domain does not belong to this tcp context")
        if not (isinstance(send_cq, TcpCQ) and isinstance(recv_cq, TcpCQ)):
            raise VerbsError("completion queues must come from a tcp context")
        qp = TcpQP(self, pd, send_cq, recv_cq, next(self._qpn) & 0xFFFFFF)
        self._objs.append(qp)
        return qp

    def _cm_params(self, qp: TcpQP, sock: socket.socket, initiator: bool) -> dict:
        params: dict = {"qp_num": qp.qp_num}
        if initiator:  # a one-shot port for the listener side's connection back
            ls = socket.create_server((sock.getsockname()[0], 0), family=sock.family)
            qp.chan_listener = ls
            qp.chan_token = os.urandom(32)
            params["chan"] = [ls.getsockname()[1], qp.chan_token.hex()]
        return params

    def _cm_complete(self, qp: TcpQP, sock: socket.socket, peer: dict, initiator: bool) -> TcpQP:
        try:
            peer_qpn = int(peer["qp_num"])
            if initiator:
                assert qp.chan_listener is not None
                ch = _accept_channel(qp.chan_listener, qp.chan_token)
                qp.chan_listener.close()
                qp.chan_listener = None
                req, resp = sock, ch
            else:
                port, token = int(peer["chan"][0]), bytes.fromhex(peer["chan"][1])
                ch = socket.create_connection((sock.getpeername()[0], port), timeout=CHANNEL_TIMEOUT)
                ch.sendall(token)
                req, resp = ch, sock
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise VerbsError(f"malformed tcp connection parameters: {e!r}") from e
        except OSError as e:
            raise VerbsError(f"tcp: second connection failed: {e}") from e
        _tune(req)
        _tune(resp)
        qp.connect(req, resp, peer_qpn)
        return qp

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for obj in reversed(self._objs):
            obj.close()
