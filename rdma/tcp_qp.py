"""The tcp provider's queue pair (see tcp.py for the protocol, the bounds and the faults).

Two connections per queue pair, one per direction of requests, so that nobody waits for a lock
held by a blocked sender and a requester reads its own acknowledgements:

* ``req``: our requests go out, their responses come back. Posting threads write it (under
  ``_slock``); whoever polls or waits on the send CQ reads it, without blocking, in ``_drain``.
* ``resp``: the peer's requests come in and our responses go out, both by the responder thread,
  which places payloads straight into the registered regions.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque

from .softcq import FLUSH, OP_READ, OP_RECV, OP_SEND, OP_WRITE, SUCCESS, SoftCQ, SoftMR
from .tcp_responder import Responder
from .tcp_wire import (
    ACK,
    F_IMM,
    HDR,
    MAX_MSG,
    MAX_SEND_WR,
    NONBLOCK,
    READ,
    READ_RESP,
    SEND,
    SMALL,
    U32,
    U64,
    WRITE,
    Gone,
    RetryExceeded,
)
from .verbs import MemoryRegion, QPState, QueuePair, VerbsError, WCOpcode, WCStatus, WorkCompletion


class TcpQP(Responder, QueuePair):
    def __init__(self, ctx, pd, scq: SoftCQ, rcq: SoftCQ, qp_num: int) -> None:
        self._ctx, self._pd, self._scq, self._rcq = ctx, pd, scq, rcq
        self.qp_num = qp_num
        self.peer_qp_num = 0
        self._state = QPState.INIT
        self._stats = ctx.stats
        # pending: [seq, wr_id, opcode, signaled, local, offset, length, status or None]
        self._pending: deque[list] = deque()
        self._plock = threading.Lock()
        self._slock = threading.Lock()
        self._rlock = threading.Lock()
        self._rq: deque[tuple[int, SoftMR, int, int]] = deque()
        self._seq = 0
        self._expect = 0
        self._peer_gone = False
        self._dead_reported = False
        self._req: socket.socket | None = None
        self._resp: socket.socket | None = None
        self._rx: threading.Thread | None = None
        self._closed = False
        self.faults = None
        self.chan_listener: socket.socket | None = None
        self.chan_token = b""
        # requester-side receive state (a non-blocking frame parser)
        self._hbuf = bytearray(HDR.size)
        self._hview = memoryview(self._hbuf)
        self._hgot = 0
        self._payload: memoryview | None = None
        self._pgot = 0
        self._pent: list | None = None
        # responder-side staging buffer for ``resp``
        self._bview = memoryview(bytearray(2 * SMALL))
        self._bstart = self._bend = 0

    @property
    def state(self) -> QPState:
        return self._state

    def connect(self, req: socket.socket, resp: socket.socket, peer_qp_num: int) -> None:
        self.peer_qp_num = peer_qp_num
        self._req, self._resp = req, resp
        self._state = QPState.RTS
        self._scq.add_fd(req, self._drain)  # type: ignore[attr-defined]
        self._rx = threading.Thread(target=self._serve_loop, name=f"rdma-tcp-qp{self.qp_num}", daemon=True)
        self._rx.start()

    # -- posting -----------------------------------------------------------------------------
    def post(
        self, op: int, opcode: WCOpcode, wr_id: int, signaled: bool, local, loff, length, addr, rkey, imm
    ):
        if self._state is not QPState.RTS:
            return self._post_in_err(wr_id, opcode)
        if not SoftMR.grants(local, self._pd, loff, length, op == READ):
            return self._decided(wr_id, opcode, WCStatus.LOC_PROT_ERR)
        if len(self._pending) >= 512:  # unpolled acknowledgements must not fill the socket buffers
            self._drain()
            if len(self._pending) >= MAX_SEND_WR:
                raise VerbsError(f"send queue full ({MAX_SEND_WR} outstanding work requests)")
        flags = 0 if imm is None else F_IMM
        payload = local.view[loff : loff + length] if op != READ else None
        with self._slock:
            with self._plock:
                seq = self._seq
                self._seq = seq + 1
                ent = [seq, wr_id, opcode, signaled, local, loff, length, None]
                self._pending.append(ent)
                failed = self._state is not QPState.RTS  # lost a race with an error
                if failed:
                    ent[7] = FLUSH
            if not failed:
                hdr = HDR.pack(op, flags, 0, (imm or 0) & U32, seq, addr & U64, rkey & U32, length)
                try:
                    self._transmit(hdr, payload)
                except RetryExceeded:
                    with self._plock:
                        ent[7] = WCStatus.RETRY_EXC_ERR
                    failed = True
                except OSError:
                    pass  # the broken connection is seen by the responder thread and by _drain
        if failed:
            self._to_err(gone=False)

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
        end = local_offset + length
        if (  # fast path: a plain small WRITE on a healthy queue pair, no faults injected
            imm_data is None
            and self._state is QPState.RTS
            and self.faults is None
            and length <= SMALL
            and SoftMR.grants(local, self._pd, local_offset, length, False)
            and len(self._pending) < 512
        ):
            with self._slock:
                with self._plock:
                    seq = self._seq
                    self._seq = seq + 1
                    self._pending.append([seq, wr_id, OP_WRITE, signaled, local, local_offset, length, None])
                hdr = HDR.pack(WRITE, 0, 0, 0, seq, remote_addr & U64, rkey & U32, length)
                try:
                    self._send(self._req, hdr + local.view[local_offset:end])
                except OSError:
                    pass  # the broken connection is seen by the responder thread and by _drain
            return
        self.post(WRITE, OP_WRITE, wr_id, signaled, local, local_offset, length, remote_addr, rkey, imm_data)

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
        self.post(READ, OP_READ, wr_id, signaled, local, local_offset, length, remote_addr, rkey, None)

    def post_send(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        self.post(SEND, OP_SEND, wr_id, signaled, local, local_offset, length, 0, 0, imm_data)

    def _transmit(self, hdr: bytes, payload: memoryview | None) -> None:
        sock = self._req
        f = self.faults
        if f is not None:
            tries = 0
            while f.drop and f.rng.random() < f.drop:
                tries += 1
                if tries > f.retry_cnt:
                    raise RetryExceeded
                time.sleep(f.rto)
            if f.delay:
                time.sleep(f.rng.uniform(0, f.delay))
        for _ in range(2 if f is not None and f.duplicate and f.rng.random() < f.duplicate else 1):
            if payload is None:
                self._send(sock, hdr)
            elif len(payload) <= SMALL:
                self._send(sock, hdr + payload)  # type: ignore[operator]
            else:
                self._send(sock, hdr)
                self._send(sock, payload)

    def _send(self, sock, data) -> None:
        """sendall that keeps reading our responses while the kernel buffer is full, so that two
        peers sending big requests (or READ answers) to each other can never deadlock."""
        try:  # the common case: the kernel takes it all at once
            n = sock.send(data, NONBLOCK)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return
        view = memoryview(data).cast("B")[n:]
        while view:
            try:
                n = sock.send(view, NONBLOCK)
            except BlockingIOError:
                self._drain()
                select.select([sock], [sock], [], 0.05)
                continue
            view = view[n:]

    def post_recv(self, local: MemoryRegion, local_offset: int, length: int, wr_id: int) -> None:
        if not SoftMR.grants(local, self._pd, local_offset, length, True):
            raise VerbsError("post_recv: buffer outside the region, foreign PD or no LOCAL_WRITE access")
        if self._state is QPState.ERR:
            self._rcq.push(WorkCompletion(wr_id, FLUSH, OP_RECV, self.qp_num))
            return
        self._rq.append((wr_id, local, local_offset, length))  # type: ignore[arg-type]

    def cut(self) -> None:
        """Fault injection: break both connections now (both queue pairs enter ERR)."""
        for s in (self._req, self._resp):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
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
            first = gone and not self._dead_reported and self._state is not QPState.ERR
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
        if self._req is not None:
            self._scq.remove_fd(self._req, self._drain)  # type: ignore[attr-defined]
        self.cut()

    # -- the requester's side of ``req``: responses, read without blocking ------------------
    def _drain(self) -> None:
        """CQ source: parse whatever responses have arrived; never blocks."""
        if self._req is None or self._state is not QPState.RTS or not self._rlock.acquire(blocking=False):
            return
        try:
            self._drain_locked()
        except (Gone, OSError):
            if self._state is QPState.RTS:
                self._to_err(gone=True)
        finally:
            self._rlock.release()

    def _drain_locked(self) -> None:
        sock = self._req
        while True:
            if self._payload is None:
                try:
                    r = sock.recv_into(self._hview[self._hgot :], HDR.size - self._hgot, NONBLOCK)  # type: ignore[union-attr]
                except BlockingIOError:
                    return
                if r == 0:
                    raise Gone("connection closed")
                self._hgot += r
                if self._hgot < HDR.size:
                    continue
                self._hgot = 0
                op, _, status, _, seq, _, _, length = HDR.unpack(self._hbuf)
                self._on_response(op, seq, status, length)
                if self._payload is None and not self._awaiting():
                    return  # nothing outstanding: skip the recv that would say EAGAIN
            else:
                try:
                    r = sock.recv_into(self._payload[self._pgot :], len(self._payload) - self._pgot, NONBLOCK)  # type: ignore[union-attr]
                except BlockingIOError:
                    return
                if r == 0:
                    raise Gone("connection closed")
                self._pgot += r
                if self._pgot == len(self._payload):
                    ent, self._payload, self._pent = self._pent, None, None
                    if ent is not None:
                        ent[7] = SUCCESS
                        self._retire()

    def _on_response(self, op: int, seq: int, status: int, length: int) -> None:
        if op == ACK and status == 0:  # fast path: the oldest outstanding request succeeded
            with self._plock:
                p = self._pending
                head = p[0] if p else None
                if head is not None and head[0] == seq and head[7] is None:
                    p.popleft()
                else:
                    head = None
            if head is not None:
                if head[3]:
                    self._scq.push(WorkCompletion(head[1], SUCCESS, head[2], self.qp_num, head[6]))
                return
        if op not in (ACK, READ_RESP) or length > MAX_MSG:
            raise Gone(f"bad response opcode {op}")
        with self._plock:
            ent = next((e for e in self._pending if e[7] is None), None)
        if ent is None or ent[0] != seq:
            if ent is None or seq < ent[0]:  # a re-ack of a duplicate
                if op == READ_RESP and length:
                    self._expect_payload(memoryview(bytearray(length)), None)
                return
            raise Gone(f"response for sequence {seq}, expected {ent[0]}")
        try:
            wc_status = WCStatus(status)
        except ValueError:
            wc_status = WCStatus.BAD_RESP_ERR
        if op == READ_RESP and wc_status is SUCCESS:
            local, loff = ent[4], ent[5]
            if length == ent[6] and local.valid:
                if length:
                    return self._expect_payload(local.view[loff : loff + length], ent)
            else:
                if length:
                    self._expect_payload(memoryview(bytearray(length)), None)
                wc_status = WCStatus.LOC_PROT_ERR
        ent[7] = wc_status
        if wc_status is SUCCESS:
            self._retire()
        else:
            self._to_err(gone=False)

    def _awaiting(self) -> bool:
        return bool(self._pending)

    def _expect_payload(self, view: memoryview, ent: list | None) -> None:
        self._payload, self._pgot, self._pent = view, 0, ent

    # -- the responder: the peer's requests on ``resp`` --------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state = QPState.ERR
        if self._req is not None:
            self._scq.remove_fd(self._req, self._drain)  # type: ignore[attr-defined]
        self.cut()
        if self._rx is not None and self._rx is not threading.current_thread():
            self._rx.join(timeout=2)
        for s in (self._req, self._resp, self.chan_listener):
            if s is not None:
                s.close()
