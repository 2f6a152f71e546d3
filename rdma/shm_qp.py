"""The shm provider's queue pair: WRITE/READ are copies by the requester alone; SEND and
WRITE_WITH_IMM consume the peer's posted receive and fill its inbound completion ring (see shm.py
for the peer-death bound and shm_layout.py for the shared structures)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from . import segment
from .futex import Doorbell
from .shm_layout import (
    ACC_REMOTE_READ,
    ACC_REMOTE_WRITE,
    BLOCK_SIZE,
    CQ_CAP,
    CQ_HEAD,
    CQ_TAIL,
    CQR,
    ERR,
    NSLOTS,
    RNR_TIMEOUT,
    RQ,
    RQ_CAP,
    RQ_HEAD,
    RQ_TAIL,
    RTS,
    ShmMR,
    slot32,
)
from .softcq import FLUSH, OP_READ, OP_RECV, OP_RECV_IMM, OP_SEND, OP_WRITE, SUCCESS
from .verbs import MemoryRegion, QPState, QueuePair, VerbsError, WCOpcode, WCStatus, WorkCompletion

if TYPE_CHECKING:
    from .shm import ShmContext, ShmCQ, ShmPD


class ShmQP(QueuePair):
    def __init__(self, ctx: ShmContext, pd: ShmPD, scq: ShmCQ, rcq: ShmCQ, qp_num: int) -> None:
        self._ctx, self._pd, self._scq, self._rcq = ctx, pd, scq, rcq
        self.qp_num = qp_num
        self._blk = segment.create(BLOCK_SIZE)
        self._b32 = memoryview(self._blk.mm).cast("I")
        self._b64 = memoryview(self._blk.mm).cast("Q")
        self._b32[1], self._b32[2], self._b32[3] = qp_num, RQ_CAP, CQ_CAP
        self._b32[0] = int(QPState.INIT)
        self._state = QPState.INIT
        self._stats = ctx.stats
        self._rcache: dict[int, tuple] = {}
        self._lock = threading.RLock()  # receive-queue consumption and state changes
        self._peer_dead = False
        self._dead_reported = False
        self._sock: socket.socket | None = None
        self._closed = False
        self.peer_qp_num = 0

    @property
    def state(self) -> QPState:
        return self._state

    def params(self) -> dict:
        return {
            "pid": os.getpid(),
            "table": self._ctx._table.ref(),
            "block": self._blk.ref(),
            "bell": self._rcq.seg.ref(),
            "qp_num": self.qp_num,
            "pd_id": self._pd.pd_id,
        }

    def connect(self, sock: socket.socket, peer: dict) -> None:
        try:
            pid = int(peer["pid"])
            tbl = segment.open_peer(pid, peer["table"])
            blk = segment.open_peer(pid, peer["block"])
            bell = segment.open_peer(pid, peer["bell"])
            self._ppd = int(peer["pd_id"])
            self.peer_qp_num = int(peer["qp_num"])
        except (KeyError, TypeError, ValueError) as e:
            raise VerbsError(f"malformed shm connection parameters: {e!r}") from e
        self._pt32 = memoryview(tbl).cast("I")
        self._pt64 = memoryview(tbl).cast("Q")
        self._pb32 = memoryview(blk).cast("I")
        self._pb64 = memoryview(blk).cast("Q")
        self._ppid = pid
        self._pbell = Doorbell(bell, 0)
        self._rcq.add_source(self._drain_inbound)
        self._sock = sock
        self._state = QPState.RTS
        self._b32[0] = RTS
        self._ctx._watcher.watch(sock, self._peer_gone)

    # -- remote regions ----------------------------------------------------------------------
    def _map_remote(self, rkey: int) -> tuple | None:
        slot = rkey & (NSLOTS - 1)
        b32, b64 = slot32(slot), 8 + slot * 8
        t32, t64 = self._pt32, self._pt64
        if t32[b32] != rkey or t32[b32 + 1] != 1 or t32[b32 + 4] != self._ppd:
            return None
        addr, length, ino, size = t64[b64 + 3], t64[b64 + 4], t64[b64 + 5], t64[b64 + 6]
        try:
            mm = segment.open_peer(self._ppid, [t32[b32 + 3], ino, size])
        except VerbsError:
            return None
        if len(self._rcache) >= 256:
            self._rcache = {k: v for k, v in self._rcache.items() if t32[v[0]] == k and t32[v[0] + 1] == 1}
        ent = (b32, addr, length, t32[b32 + 2], memoryview(mm)[:length])
        self._rcache[rkey] = ent
        return ent

    # -- work requests -----------------------------------------------------------------------
    def _remote(self, rkey: int, need: int) -> tuple | None:
        """The peer's region ``rkey`` while it is still registered with access ``need``, else None."""
        ent = self._rcache.get(rkey) or self._map_remote(rkey)
        t32 = self._pt32
        if ent is None or t32[ent[0]] != rkey or t32[ent[0] + 1] != 1 or (ent[3] & need) != need:
            return None
        return ent

    def _remote_span(self, rkey: int, need: int, remote_addr: int, length: int) -> memoryview | None:
        """The ``length`` bytes at ``remote_addr`` of the peer's region ``rkey``, or None if the
        region is gone, lacks access ``need`` or does not hold them."""
        ent = self._remote(rkey, need)
        if ent is None:
            return None
        off = remote_addr - ent[1]
        if off < 0 or off + length > ent[2]:
            return None
        return ent[4][off : off + length]

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
        if self._state is not QPState.RTS or self._pb32[0] != RTS:
            return self._post_in_err(wr_id, OP_WRITE)
        if not ShmMR.grants(local, self._pd, local_offset, length, False):
            return self._fail(wr_id, OP_WRITE, WCStatus.LOC_PROT_ERR)
        end = local_offset + length
        dst = self._remote_span(rkey, ACC_REMOTE_WRITE, remote_addr, length)
        if dst is None:
            return self._fail(wr_id, OP_WRITE, WCStatus.REM_ACCESS_ERR)
        if imm_data is None:
            dst[:] = local.view[local_offset:end]
        else:
            with self._lock:
                recv = self._take_recv()
                if recv is None:
                    return self._fail(wr_id, OP_WRITE, WCStatus.RNR_RETRY_EXC_ERR)
                dst[:] = local.view[local_offset:end]
                if not self._deliver(recv[0], SUCCESS, OP_RECV_IMM, length, imm_data):
                    return self._fail(wr_id, OP_WRITE, WCStatus.REM_OP_ERR)
        st = self._stats
        st[0] += 1
        st[1] += length
        if signaled:
            self._scq.push(WorkCompletion(wr_id, SUCCESS, OP_WRITE, self.qp_num, length))

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
        if self._state is not QPState.RTS or self._pb32[0] != RTS:
            return self._post_in_err(wr_id, OP_READ)
        if not ShmMR.grants(local, self._pd, local_offset, length, True):
            return self._fail(wr_id, OP_READ, WCStatus.LOC_PROT_ERR)
        src = self._remote_span(rkey, ACC_REMOTE_READ, remote_addr, length)
        if src is None:
            return self._fail(wr_id, OP_READ, WCStatus.REM_ACCESS_ERR)
        local.view[local_offset : local_offset + length] = src
        if signaled:
            self._scq.push(WorkCompletion(wr_id, SUCCESS, OP_READ, self.qp_num, length))

    def post_send(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        if self._state is not QPState.RTS or self._pb32[0] != RTS:
            return self._post_in_err(wr_id, OP_SEND)
        if not ShmMR.grants(local, self._pd, local_offset, length, False):
            return self._fail(wr_id, OP_SEND, WCStatus.LOC_PROT_ERR)
        end = local_offset + length
        with self._lock:
            recv = self._take_recv()
            if recv is None:
                return self._fail(wr_id, OP_SEND, WCStatus.RNR_RETRY_EXC_ERR)
            r_wr, r_key, r_off, r_len = recv
            ent = self._remote(r_key, 0)
            if ent is None or r_off + r_len > ent[2]:
                self._deliver(r_wr, WCStatus.LOC_PROT_ERR, OP_RECV, 0, None)
                return self._fail(wr_id, OP_SEND, WCStatus.REM_OP_ERR)
            if length > r_len:
                self._deliver(r_wr, WCStatus.LOC_LEN_ERR, OP_RECV, 0, None)
                return self._fail(wr_id, OP_SEND, WCStatus.REM_INV_REQ_ERR)
            ent[4][r_off : r_off + length] = local.view[local_offset:end]
            if not self._deliver(r_wr, SUCCESS, OP_RECV, length, imm_data):
                return self._fail(wr_id, OP_SEND, WCStatus.REM_OP_ERR)
        if signaled:
            self._scq.push(WorkCompletion(wr_id, SUCCESS, OP_SEND, self.qp_num, length))

    def post_recv(self, local: MemoryRegion, local_offset: int, length: int, wr_id: int) -> None:
        if not ShmMR.grants(local, self._pd, local_offset, length, True):
            raise VerbsError("post_recv: buffer outside the region, foreign PD or no LOCAL_WRITE access")
        if self._state is QPState.ERR:
            self._rcq.push(WorkCompletion(wr_id, FLUSH, OP_RECV, self.qp_num))
            return
        b = self._b64
        tail = b[RQ_TAIL]
        if tail - b[RQ_HEAD] >= RQ_CAP:
            raise VerbsError(f"receive queue full ({RQ_CAP} entries)")
        i = RQ + (tail % RQ_CAP) * 4
        b[i], b[i + 1], b[i + 2], b[i + 3] = wr_id, local.rkey, local_offset, length
        b[RQ_TAIL] = tail + 1

    # -- the peer's queues (requester side) --------------------------------------------------
    def _take_recv(self) -> tuple[int, int, int, int] | None:
        pb = self._pb64
        head = pb[RQ_HEAD]
        if pb[RQ_TAIL] == head:
            deadline = time.monotonic() + RNR_TIMEOUT
            while pb[RQ_TAIL] == head:
                if time.monotonic() > deadline or self._state is not QPState.RTS or self._pb32[0] != RTS:
                    return None
                time.sleep(0.0002)
        i = RQ + (head % RQ_CAP) * 4
        r = (pb[i], pb[i + 1], pb[i + 2], pb[i + 3])
        pb[RQ_HEAD] = head + 1
        return r

    def _deliver(self, wr_id: int, status: int, opcode: int, byte_len: int, imm: int | None) -> bool:
        pb = self._pb64
        tail = pb[CQ_TAIL]
        if tail - pb[CQ_HEAD] >= CQ_CAP:
            return False
        i = CQR + (tail % CQ_CAP) * 4
        flags = int(status) | (int(opcode) << 8) | ((imm is not None) << 16)
        pb[i], pb[i + 1], pb[i + 2], pb[i + 3] = wr_id, flags, byte_len, (imm or 0) & 0xFFFFFFFF
        pb[CQ_TAIL] = tail + 1
        self._pbell.ring()
        return True

    def _drain_inbound(self) -> None:
        """Source of the receive CQ: completions the peer wrote into our block."""
        b = self._b64
        head, tail = b[CQ_HEAD], b[CQ_TAIL]
        if head == tail:
            return
        q = self._rcq._q
        while head != tail:
            i = CQR + (head % CQ_CAP) * 4
            flags = b[i + 1]
            try:
                status, opcode = WCStatus(flags & 0xFF), WCOpcode((flags >> 8) & 0xFF)
            except ValueError:
                status, opcode = WCStatus.GENERAL_ERR, WCOpcode.RECV
            imm = b[i + 3] if flags >> 16 & 1 else None
            q.append(WorkCompletion(b[i], status, opcode, self.qp_num, b[i + 2], imm))
            head += 1
        b[CQ_HEAD] = head

    # -- errors ------------------------------------------------------------------------------
    def _fail(self, wr_id: int, opcode: WCOpcode, status: WCStatus) -> None:
        self._stats[2] += 1
        self._scq.push(WorkCompletion(wr_id, status, opcode, self.qp_num))
        self._to_err()

    def _post_in_err(self, wr_id: int, opcode: WCOpcode) -> None:
        status = FLUSH
        if self._peer_dead and not self._dead_reported:
            self._dead_reported = True
            status = WCStatus.RETRY_EXC_ERR
        elif self._state is QPState.RTS:  # the peer closed its queue pair
            status = WCStatus.RETRY_EXC_ERR
        self._stats[2] += 1
        self._scq.push(WorkCompletion(wr_id, status, opcode, self.qp_num))
        self._to_err()

    def _peer_gone(self) -> None:
        with self._lock:
            if self._state is QPState.ERR:  # our own shutdown after an error, not a death
                return
            self._peer_dead = True
        self._to_err()

    def _to_err(self) -> None:
        with self._lock:
            if self._state is QPState.ERR:
                return
            self._state = QPState.ERR
            self._b32[0] = ERR
        with self._rcq._src_lock:
            self._drain_inbound()
        b = self._b64
        head, tail = b[RQ_HEAD], b[RQ_TAIL]
        b[RQ_HEAD] = tail
        for n in range(head, tail):
            self._rcq.push(WorkCompletion(b[RQ + (n % RQ_CAP) * 4], FLUSH, OP_RECV, self.qp_num))
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._state is not QPState.ERR:
            self._state = QPState.ERR
            self._b32[0] = ERR
        if self._sock is not None:
            self._ctx._watcher.unwatch(self._sock)
            self._sock.close()
            self._rcq.remove_source(self._drain_inbound)
        self._blk.close_fd()
        self._rcache = {}
