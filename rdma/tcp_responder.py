"""The responder half of a tcp queue pair: one thread reads the peer's requests from ``resp``,
places WRITE/SEND payloads straight into registered regions, answers READs, and acknowledges
each request after executing it (duplicates, recognised by sequence number, are only re-acked)."""

from __future__ import annotations

import time

from .softcq import OP_RECV, OP_RECV_IMM, SUCCESS, SoftMR
from .tcp_wire import (
    ACC_REMOTE_READ,
    ACC_REMOTE_WRITE,
    ACK,
    F_IMM,
    HDR,
    MAX_MSG,
    READ,
    READ_RESP,
    RNR_TIMEOUT,
    SEND,
    SMALL,
    WRITE,
    Gone,
)
from .verbs import QPState, WCStatus, WorkCompletion


class Responder:
    """Mixin of TcpQP; uses its ``_resp``, ``_pd``, ``_rcq``, ``_rq``, ``_state`` and ``_expect``."""

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from ``resp``: buffered bytes first, big remainders straight from the socket."""
        n = len(view)
        got = 0
        avail = self._bend - self._bstart
        if avail:
            k = min(n, avail)
            view[:k] = self._bview[self._bstart : self._bstart + k]
            self._bstart += k
            got = k
        sock = self._resp
        while got < n:
            if n - got >= SMALL:
                r = sock.recv_into(view[got:], n - got)  # type: ignore[union-attr]
                if r == 0:
                    raise Gone("connection closed")
                got += r
            else:
                self._fill()
                k = min(n - got, self._bend - self._bstart)
                view[got : got + k] = self._bview[self._bstart : self._bstart + k]
                self._bstart += k
                got += k

    def _fill(self) -> None:
        """One recv into the staging buffer: a small request usually arrives whole (header and
        payload in one system call)."""
        if self._bstart == self._bend:
            self._bstart = self._bend = 0
        r = self._resp.recv_into(self._bview[self._bend :], len(self._bview) - self._bend)  # type: ignore[union-attr]
        if r == 0:
            raise Gone("connection closed")
        self._bend += r

    def _header(self) -> tuple:
        if self._bend - self._bstart < HDR.size:
            if len(self._bview) - self._bstart < HDR.size:  # compact
                left = self._bend - self._bstart
                self._bview[:left] = self._bview[self._bstart : self._bend]
                self._bstart, self._bend = 0, left
            while self._bend - self._bstart < HDR.size:
                self._fill()
        h = HDR.unpack_from(self._bview, self._bstart)
        self._bstart += HDR.size
        return h

    def _discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
        while n > 0:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    def _serve_loop(self) -> None:
        mrs, pack = self._pd.mrs, HDR.pack
        sock = self._resp
        try:
            while self._state is QPState.RTS:
                op, flags, _, imm, seq, addr, rkey, length = self._header()
                # fast path: an in-order plain WRITE, within a region, already in the buffer
                if op == WRITE and not flags and seq == self._expect and self._bend - self._bstart >= length:
                    mr = mrs.get(rkey)
                    if mr is not None:
                        off = addr - mr.addr
                        if (
                            mr.valid
                            and mr.access_bits & ACC_REMOTE_WRITE
                            and 0 <= off
                            and off + length <= mr.length
                        ):
                            b = self._bstart
                            mr.view[off : off + length] = self._bview[b : b + length]
                            self._bstart = b + length
                            self._expect = seq + 1
                            sock.sendall(pack(ACK, 0, 0, 0, seq, 0, 0, 0))  # type: ignore[union-attr]
                            continue
                if length > MAX_MSG or op not in (WRITE, SEND, READ):
                    raise Gone(f"bad request opcode {op} / length {length}")
                self._serve(op, flags, imm, seq, addr, rkey, length)
        except (Gone, OSError):
            pass
        if not self._closed and self._state is not QPState.ERR:  # not a cut of our own
            self._to_err(gone=True)

    def _take_recv(self) -> tuple[int, SoftMR, int, int] | None:
        deadline = time.monotonic() + RNR_TIMEOUT
        while True:
            try:
                return self._rq.popleft()
            except IndexError:
                if time.monotonic() > deadline or self._state is not QPState.RTS:
                    return None
                time.sleep(0.0002)

    def _ack(self, seq: int, status: int) -> None:
        self._resp.sendall(HDR.pack(ACK, 0, status, 0, seq, 0, 0, 0))  # type: ignore[union-attr]

    def _serve(self, op: int, flags: int, imm: int, seq: int, addr: int, rkey: int, length: int) -> None:
        if seq < self._expect:  # duplicate: acknowledge again, do not execute twice
            if op != READ:
                self._discard(length)
                return self._ack(seq, 0)
        elif seq != self._expect:
            raise Gone(f"request sequence {seq}, expected {self._expect}")
        else:
            self._expect = seq + 1
        status = SUCCESS
        rcq, qpn = self._rcq, self.qp_num
        if op == SEND:
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
                    WorkCompletion(recv[0], SUCCESS, OP_RECV, qpn, length, imm if flags & F_IMM else None)
                )
            return self._ack(seq, int(status))
        mr = self._pd.mrs.get(rkey)
        need = ACC_REMOTE_WRITE if op == WRITE else ACC_REMOTE_READ
        off = addr - mr.addr if mr is not None else -1
        if mr is None or not mr.valid or not mr.access_bits & need or off < 0 or off + length > mr.length:
            status = WCStatus.REM_ACCESS_ERR
        if op == READ:
            sock = self._resp
            if status is SUCCESS:
                hdr = HDR.pack(READ_RESP, 0, 0, 0, seq, 0, 0, length)
                data = mr.view[off : off + length]  # type: ignore[union-attr]
                if length <= SMALL:
                    sock.sendall(hdr + data)  # type: ignore[union-attr]
                else:
                    sock.sendall(hdr)  # type: ignore[union-attr]
                    sock.sendall(data)  # type: ignore[union-attr]
            else:
                sock.sendall(HDR.pack(READ_RESP, 0, int(status), 0, seq, 0, 0, 0))  # type: ignore[union-attr]
            return
        recv = None
        if status is SUCCESS and flags & F_IMM:
            recv = self._take_recv()
            if recv is None:
                status = WCStatus.RNR_RETRY_EXC_ERR
        if status is SUCCESS:
            self._recv_into(mr.view[off : off + length])  # type: ignore[union-attr]
            if recv is not None:
                rcq.push(WorkCompletion(recv[0], SUCCESS, OP_RECV_IMM, qpn, length, imm))
        else:
            self._discard(length)
        self._ack(seq, int(status))
