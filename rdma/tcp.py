"""The ``tcp`` provider: reliable-connected verbs in software over one TCP connection, like siw.

The connection the handshake authenticated carries 32-byte headers (op, flags, status, imm,
sequence number, address, rkey, length) and payloads in both directions. Each queue pair has one
responder thread that reads the connection: it places WRITE and SEND payloads straight into the
registered region (``recv_into`` the region's memory), answers READs, and acknowledges every
request *after* placing it, so a requester's completion means the bytes are in the remote region.
The same thread turns acknowledgements into completions, in posting order. A NAK (bad rkey, out of
bounds, missing access right, no receive posted) completes that work request with the verbs
status; the queue pair then enters ERR and flushes the rest (WR_FLUSH_ERR) as ibverbs does.

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
* ``cut()``: the connection breaks. Both queue pairs enter ERR; outstanding work requests
  complete with RETRY_EXC_ERR / WR_FLUSH_ERR. Consensus must survive every one of these.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import secrets
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from . import metrics
from .softcq import (
    FLUSH,
    OP_READ,
    OP_RECV,
    OP_RECV_IMM,
    OP_SEND,
    OP_WRITE,
    SUCCESS,
    SoftCQ,
    SoftMR,
    check_length,
)
from .verbs import (
    Access,
    Context,
    MemoryRegion,
    ProtectionDomain,
    QPState,
    QueuePair,
    VerbsError,
    WCOpcode,
    WCStatus,
    WorkCompletion,
)

_HDR = struct.Struct("<BBHIQQII")  # op, flags, status, imm, seq, addr, rkey, length
_WRITE, _READ, _SEND, _ACK, _READ_RESP = 1, 2, 3, 0x81, 0x82
_F_IMM = 1
MAX_SEND_WR = 4096
MAX_MSG = 1 << 30
RNR_TIMEOUT = 0.1
SPIN = float(os.environ.get("RDMA_TCP_SPIN_US", "150")) * 1e-6
KEEPALIVE = (1, 1, 3)  # idle, interval, probes
USER_TIMEOUT_MS = 4000
_REMOTE_WRITE, _REMOTE_READ, _LOCAL_WRITE = int(Access.REMOTE_WRITE), int(Access.REMOTE_READ), 1
_SMALL = 65536
_U64, _U32 = (1 << 64) - 1, (1 << 32) - 1


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


class _Gone(Exception):
    """The connection ended or the peer broke the protocol."""


class _RetryExceeded(Exception):
    pass


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

    def create_cq(self, depth: int = 1024) -> SoftCQ:
        # The producer is a thread of this process: spin yielding the GIL, then sleep.
        cq = SoftCQ(mmap.mmap(-1, 4096), spin=SPIN, yield_in_spin=True)
        self._objs.append(cq)
        return cq

    def _cm_prepare(self, pd: ProtectionDomain, send_cq: SoftCQ, recv_cq: SoftCQ) -> TcpQP:
        if not (isinstance(pd, TcpPD) and pd.ctx is self):
            raise VerbsError("protection domain does not belong to this tcp context")
        qp = TcpQP(self, pd, send_cq, recv_cq, next(self._qpn) & 0xFFFFFF)
        self._objs.append(qp)
        return qp

    def _cm_params(self, qp: TcpQP) -> dict:
        return {"qp_num": qp.qp_num}

    def _cm_complete(self, qp: TcpQP, sock: socket.socket, peer: dict) -> TcpQP:
        qp.connect(sock, peer)
        return qp

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for obj in reversed(self._objs):
            obj.close()


class TcpQP(QueuePair):
    def __init__(self, ctx: TcpContext, pd: TcpPD, scq: SoftCQ, rcq: SoftCQ, qp_num: int) -> None:
        self._ctx, self._pd, self._scq, self._rcq = ctx, pd, scq, rcq
        self.qp_num = qp_num
        self.peer_qp_num = 0
        self._state = QPState.INIT
        self._stats = ctx.stats
        # pending: [seq, wr_id, opcode, signaled, local, offset, length, status or None]
        self._pending: deque[list] = deque()
        self._plock = threading.Lock()
        self._slock = threading.Lock()
        self._ctrl: deque[bytes] = deque()
        self._rq: deque[tuple[int, SoftMR, int, int]] = deque()
        self._seq = 0
        self._expect = 0
        self._peer_gone = False
        self._dead_reported = False
        self._sock: socket.socket | None = None
        self._rx: threading.Thread | None = None
        self._closed = False
        self.faults: Faults | None = None

    @property
    def state(self) -> QPState:
        return self._state

    def connect(self, sock: socket.socket, peer: dict) -> None:
        try:
            self.peer_qp_num = int(peer["qp_num"])
        except (KeyError, TypeError, ValueError) as e:
            raise VerbsError(f"malformed tcp connection parameters: {e!r}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, intvl, cnt = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        sock.settimeout(None)
        self._sock = sock
        self._state = QPState.RTS
        self._rx = threading.Thread(target=self._rx_loop, name=f"rdma-tcp-qp{self.qp_num}", daemon=True)
        self._rx.start()

    # -- posting -----------------------------------------------------------------------------
    def _local_bad(self, local: MemoryRegion, offset: int, length: int, need_write: bool) -> bool:
        return not (
            type(local) is SoftMR
            and local.valid
            and local.pd is self._pd
            and (not need_write or local.access & _LOCAL_WRITE)
            and 0 <= offset <= offset + length <= local.length
        )

    def _post(self, op, opcode, wr_id, signaled, local, loff, length, addr, rkey, imm) -> None:
        if self._state is not QPState.RTS:
            return self._post_in_err(wr_id, opcode)
        if self._local_bad(local, loff, length, op == _READ):
            return self._decided(wr_id, opcode, WCStatus.LOC_PROT_ERR)
        flags = 0 if imm is None else _F_IMM
        payload = local.view[loff : loff + length] if op != _READ else None
        with self._slock:
            with self._plock:
                if len(self._pending) >= MAX_SEND_WR:
                    raise VerbsError(f"send queue full ({MAX_SEND_WR} outstanding work requests)")
                seq = self._seq
                self._seq = seq + 1
                ent = [seq, wr_id, opcode, signaled, local, loff, length, None]
                self._pending.append(ent)
                if self._state is not QPState.RTS:  # lost a race with the responder thread
                    ent[7] = FLUSH
            failed = ent[7] is not None
            if not failed:
                hdr = _HDR.pack(op, flags, 0, (imm or 0) & 0xFFFFFFFF, seq, addr & _U64, rkey & _U32, length)
                try:
                    self._transmit(hdr, payload)
                except _RetryExceeded:
                    with self._plock:
                        ent[7] = WCStatus.RETRY_EXC_ERR
                    failed = True
                except OSError:
                    pass  # the responder thread sees the broken connection and moves the QP to ERR
        if failed:
            self._to_err(gone=False)
        self._flush_ctrl()

    def _transmit(self, hdr: bytes, payload: memoryview | None) -> None:
        sock = self._sock
        f = self.faults
        if f is not None:
            tries = 0
            while f.drop and f.rng.random() < f.drop:
                tries += 1
                if tries > f.retry_cnt:
                    raise _RetryExceeded
                time.sleep(f.rto)
            if f.delay:
                time.sleep(f.rng.uniform(0, f.delay))
        if payload is None:
            sock.sendall(hdr)  # type: ignore[union-attr]
        elif len(payload) <= _SMALL:
            sock.sendall(hdr + payload)  # type: ignore[union-attr, operator]
        else:
            sock.sendall(hdr)  # type: ignore[union-attr]
            sock.sendall(payload)  # type: ignore[union-attr]
        if f is not None and f.duplicate and f.rng.random() < f.duplicate:
            self._transmit_plain(hdr, payload)

    def _transmit_plain(self, hdr: bytes, payload: memoryview | None) -> None:
        self._sock.sendall(hdr)  # type: ignore[union-attr]
        if payload is not None:
            self._sock.sendall(payload)  # type: ignore[union-attr]

    def post_write(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        remote_addr: int,
        rkey: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        st = self._stats
        st[0] += 1
        st[1] += length
        self._post(
            _WRITE, OP_WRITE, wr_id, signaled, local, local_offset, length, remote_addr, rkey, imm_data
        )

    def post_read(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        remote_addr: int,
        rkey: int,
        wr_id: int,
        signaled: bool = True,
    ) -> None:
        self._post(_READ, OP_READ, wr_id, signaled, local, local_offset, length, remote_addr, rkey, None)

    def post_send(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        self._post(_SEND, OP_SEND, wr_id, signaled, local, local_offset, length, 0, 0, imm_data)

    def post_recv(self, local: MemoryRegion, local_offset: int, length: int, wr_id: int) -> None:
        if self._local_bad(local, local_offset, length, True):
            raise VerbsError("post_recv: buffer outside the region, foreign PD or no LOCAL_WRITE access")
        if self._state is QPState.ERR:
            self._rcq.push(WorkCompletion(wr_id, FLUSH, OP_RECV, self.qp_num))
            return
        self._rq.append((wr_id, local, local_offset, length))  # type: ignore[arg-type]

    def cut(self) -> None:
        """Fault injection: break the connection now (both queue pairs enter ERR)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- completions -------------------------------------------------------------------------
    def _decided(self, wr_id: int, opcode: WCOpcode, status: WCStatus) -> None:
        with self._plock:
            self._pending.append([-1, wr_id, opcode, True, None, 0, 0, status])
        self._to_err(gone=False)

    def _post_in_err(self, wr_id: int, opcode: WCOpcode) -> None:
        status = FLUSH
        if self._peer_gone and not self._dead_reported:
            self._dead_reported = True
            status = WCStatus.RETRY_EXC_ERR
        with self._plock:
            self._pending.append([-1, wr_id, opcode, True, None, 0, 0, status])
        self._retire()

    def _retire(self) -> None:
        """Complete decided work requests at the head of the send queue, in posting order."""
        out = []
        with self._plock:
            p = self._pending
            while p and p[0][7] is not None:
                out.append(p.popleft())
        for _, wr_id, opcode, signaled, _, _, length, status in out:
            if status is SUCCESS:
                if signaled:
                    self._scq.push(WorkCompletion(wr_id, SUCCESS, opcode, self.qp_num, length))
            else:
                self._stats[2] += 1
                self._scq.push(WorkCompletion(wr_id, status, opcode, self.qp_num))

    def _to_err(self, gone: bool) -> None:
        with self._plock:
            if self._state is QPState.ERR and not gone:
                first = False
            else:
                first = gone and not self._dead_reported
            self._state = QPState.ERR
            if gone:
                self._peer_gone = True
            for ent in self._pending:
                if ent[7] is None:
                    ent[7] = WCStatus.RETRY_EXC_ERR if first else FLUSH
                    if first:
                        self._dead_reported = True
                    first = False
        self._retire()
        while self._rq:
            try:
                wr_id = self._rq.popleft()[0]
            except IndexError:
                break
            self._rcq.push(WorkCompletion(wr_id, FLUSH, OP_RECV, self.qp_num))
        self.cut()

    # -- the responder/ack thread ------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        sock = self._sock
        n = len(view)
        got = 0
        while got < n:
            r = sock.recv_into(view[got:], n - got)  # type: ignore[union-attr]
            if r == 0:
                raise _Gone("connection closed")
            got += r

    def _discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
        while n > 0:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    def _queue_ctrl(self, data: bytes) -> None:
        self._ctrl.append(data)
        self._flush_ctrl()

    def _flush_ctrl(self) -> None:
        while self._ctrl and self._slock.acquire(blocking=False):
            try:
                parts = []
                while self._ctrl:
                    parts.append(self._ctrl.popleft())
                self._sock.sendall(b"".join(parts))  # type: ignore[union-attr]
            except OSError:
                return
            finally:
                self._slock.release()

    def _rx_loop(self) -> None:
        hbuf = bytearray(_HDR.size)
        hview = memoryview(hbuf)
        try:
            while self._state is QPState.RTS:
                self._recv_into(hview)
                op, flags, status, imm, seq, addr, rkey, length = _HDR.unpack(hbuf)
                if length > MAX_MSG:
                    raise _Gone(f"message of {length} bytes")
                if op == _ACK or op == _READ_RESP:
                    self._on_response(op, seq, status, length)
                elif op in (_WRITE, _SEND, _READ):
                    self._serve(op, flags, imm, seq, addr, rkey, length)
                else:
                    raise _Gone(f"unknown opcode {op}")
        except (_Gone, OSError):
            pass
        if not self._closed and self._state is not QPState.ERR:  # not a cut of our own
            self._to_err(gone=True)

    def _on_response(self, op: int, seq: int, status: int, length: int) -> None:
        with self._plock:
            ent = next((e for e in self._pending if e[7] is None), None)
        if ent is None or ent[0] != seq:
            if ent is None or seq < ent[0]:  # a re-ack of a duplicate
                if op == _READ_RESP:
                    self._discard(length)
                return
            raise _Gone(f"response for sequence {seq}, expected {ent[0]}")
        try:
            wc_status = WCStatus(status)
        except ValueError:
            wc_status = WCStatus.BAD_RESP_ERR
        if op == _READ_RESP:
            local, loff = ent[4], ent[5]
            if wc_status is SUCCESS and length == ent[6] and local.valid:
                self._recv_into(local.view[loff : loff + length])
            else:
                self._discard(length)
                if wc_status is SUCCESS:
                    wc_status = WCStatus.LOC_PROT_ERR
        ent[7] = SUCCESS if wc_status is SUCCESS else wc_status
        if ent[7] is SUCCESS:
            self._retire()
        else:
            self._to_err(gone=False)

    def _take_recv(self) -> tuple[int, SoftMR, int, int] | None:
        deadline = time.monotonic() + RNR_TIMEOUT
        while True:
            try:
                return self._rq.popleft()
            except IndexError:
                if time.monotonic() > deadline or self._state is not QPState.RTS:
                    return None
                time.sleep(0.0002)

    def _serve(self, op: int, flags: int, imm: int, seq: int, addr: int, rkey: int, length: int) -> None:
        if seq < self._expect:  # duplicate: acknowledge again, do not execute twice
            if op != _READ:
                self._discard(length)
                self._queue_ctrl(_HDR.pack(_ACK, 0, 0, 0, seq, 0, 0, 0))
                return
        elif seq != self._expect:
            raise _Gone(f"request sequence {seq}, expected {self._expect}")
        else:
            self._expect = seq + 1
        status = SUCCESS
        rcq, qpn = self._rcq, self.qp_num
        if op == _SEND:
            recv = self._take_recv()
            if recv is None:
                self._discard(length)
                status = WCStatus.RNR_RETRY_EXC_ERR
            elif length > recv[3]:
                self._discard(length)
                rcq.push(WorkCompletion(recv[0], WCStatus.LOC_LEN_ERR, OP_RECV, qpn))
                status = WCStatus.REM_INV_REQ_ERR
            else:
                self._recv_into(recv[1].view[recv[2] : recv[2] + length])
                rcq.push(
                    WorkCompletion(recv[0], SUCCESS, OP_RECV, qpn, length, imm if flags & _F_IMM else None)
                )
            self._queue_ctrl(_HDR.pack(_ACK, 0, int(status), 0, seq, 0, 0, 0))
            return
        mr = self._pd.mrs.get(rkey)
        need = _REMOTE_WRITE if op == _WRITE else _REMOTE_READ
        off = addr - mr.addr if mr is not None else -1
        if mr is None or not mr.valid or not mr.access & need or off < 0 or off + length > mr.length:
            status = WCStatus.REM_ACCESS_ERR
        if op == _READ:
            if status is SUCCESS:
                data = bytes(mr.view[off : off + length])  # type: ignore[union-attr]
                self._queue_ctrl(_HDR.pack(_READ_RESP, 0, 0, 0, seq, 0, 0, length) + data)
            else:
                self._queue_ctrl(_HDR.pack(_READ_RESP, 0, int(status), 0, seq, 0, 0, 0))
            return
        recv = None
        if status is SUCCESS and flags & _F_IMM:
            recv = self._take_recv()
            if recv is None:
                status = WCStatus.RNR_RETRY_EXC_ERR
        if status is SUCCESS:
            self._recv_into(mr.view[off : off + length])  # type: ignore[union-attr]
            if recv is not None:
                rcq.push(WorkCompletion(recv[0], SUCCESS, OP_RECV_IMM, qpn, length, imm))
        else:
            self._discard(length)
        self._queue_ctrl(_HDR.pack(_ACK, 0, int(status), 0, seq, 0, 0, 0))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state = QPState.ERR
        self.cut()
        if self._rx is not None and self._rx is not threading.current_thread():
            self._rx.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
