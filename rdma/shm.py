"""The ``shm`` provider: one-sided verbs between processes on one host through shared memory.

* Every memory region is a shared segment (``segment.py``: mode 0600, unlinked at once, mapped
  by peers through ``/proc/<pid>/fd``). A context publishes a registration table in shared
  memory (rkey, state, access, PD, address, length per slot); a requester checks the *live* table
  entry on every work request, so a deregistration is seen at once and an access outside a region,
  with a wrong rkey, a foreign PD or without the access right completes with REM_ACCESS_ERR.
* WRITE and READ are a copy by the requester alone into or out of its mapping of the peer's
  segment: the peer's CPU does nothing, as with an RNIC.
* Each queue pair owns a block with its receive queue (posted by the owner, consumed by the peer)
  and an inbound completion ring (written by the peer, drained by the owner's receive CQ). SEND and
  WRITE_WITH_IMM consume a posted receive; the requester rings the peer CQ's futex doorbell.
  With no receive posted the requester retries for ``RNR_TIMEOUT`` and then completes with
  RNR_RETRY_EXC_ERR (an RC queue pair with a finite rnr_retry).
* Peer death: the handshake's TCP connection stays open for the queue pair's lifetime and a
  watcher thread (one per context, asleep in epoll) sees its EOF when the peer closes or dies
  (the kernel closes a killed process's sockets). The queue pair then enters ERR: posted receives
  flush with WR_FLUSH_ERR, the next work request completes with RETRY_EXC_ERR and later ones
  with WR_FLUSH_ERR. Bound: the time the kernel takes to close the dead process's sockets plus one
  thread wakeup, in practice milliseconds; a graceful ``close`` is seen on the next work request.
"""

from __future__ import annotations

import itertools
import os
import resource
import selectors
import socket
import threading
import time

from . import metrics, segment
from .futex import Doorbell
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
    buffer_address,
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

NSLOTS = 4096
SLOT_BITS = 12
TABLE_SIZE = 64 + NSLOTS * 64
RQ_CAP = 1024
CQ_CAP = 4096
BLOCK_SIZE = 512 + (RQ_CAP + CQ_CAP) * 32
RNR_TIMEOUT = 0.1
_RTS, _ERR = int(QPState.RTS), int(QPState.ERR)
# u64 indexes inside a queue-pair block (head/tail words on separate cache lines)
_RQ_HEAD, _RQ_TAIL, _CQ_HEAD, _CQ_TAIL = 8, 16, 24, 32
_RQ, _CQR = 64, 64 + RQ_CAP * 4
_REMOTE_WRITE, _REMOTE_READ, _LOCAL_WRITE = int(Access.REMOTE_WRITE), int(Access.REMOTE_READ), 1


def _slot32(slot: int) -> int:
    return 16 + slot * 16


class ShmMR(SoftMR):
    seg: segment.Segment


class ShmPD(ProtectionDomain):
    def __init__(self, ctx: ShmContext, pd_id: int) -> None:
        self.ctx = ctx
        self.pd_id = pd_id
        self._mrs: dict[int, ShmMR] = {}

    def reg_mr(self, length: int, access: Access) -> MemoryRegion:
        check_length(length)
        if access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC) and not access & Access.LOCAL_WRITE:
            raise VerbsError("REMOTE_WRITE/REMOTE_ATOMIC access requires LOCAL_WRITE (as ibv_reg_mr)")
        seg = segment.create(length)
        rkey = self.ctx._register(self.pd_id, seg, buffer_address(seg.mm), length, int(access))
        mr = ShmMR(self, seg.mm, length, access, rkey)
        mr.seg = seg
        self._mrs[rkey] = mr
        return mr

    def _dereg(self, mr: ShmMR) -> None:
        self.ctx._unregister(mr.rkey)
        mr.seg.close_fd()
        self._mrs.pop(mr.rkey, None)

    def close(self) -> None:
        for mr in list(self._mrs.values()):
            mr.close()


class ShmCQ(SoftCQ):
    def __init__(self, ctx: ShmContext) -> None:
        self.seg = segment.create(4096)
        super().__init__(self.seg.mm)

    def close(self) -> None:
        super().close()
        self.seg.close_fd()


class _Watcher:
    """One thread per context, asleep in epoll on the handshake sockets of its queue pairs."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._r, self._w = os.pipe()
        self._sel.register(self._r, selectors.EVENT_READ, None)
        self._stop = False

    def watch(self, sock: socket.socket, on_eof) -> None:
        with self._lock:
            self._sel.register(sock, selectors.EVENT_READ, on_eof)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rdma-shm-watch", daemon=True)
                self._thread.start()

    def unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select():
                if key.data is None:
                    os.read(self._r, 64)
                    continue
                sock = key.fileobj
                try:
                    data = sock.recv(64, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.unwatch(sock)  # type: ignore[arg-type]
                    key.data()

    def close(self) -> None:
        self._stop = True
        os.write(self._w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sel.close()
        os.close(self._r)
        os.close(self._w)


def _raise_nofile() -> None:
    """Every region holds descriptors (ours and Python's mmap duplicate; one more per peer
    mapping), so lift the soft RLIMIT_NOFILE to the hard limit, as servers commonly do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


class ShmContext(Context):
    provider = "shm"

    def __init__(self) -> None:
        segment.janitor()
        _raise_nofile()
        self._table = segment.create(TABLE_SIZE)
        self._t32 = memoryview(self._table.mm).cast("I")
        self._t64 = memoryview(self._table.mm).cast("Q")
        self._gen = [0] * NSLOTS
        self._free = list(range(NSLOTS - 1, -1, -1))
        self._lock = threading.Lock()
        self._pd_ids = itertools.count(1)
        self._qpn = itertools.count((os.getpid() * 4099) & 0xFFFF00)
        self._watcher = _Watcher()
        self.stats = metrics.stats("shm")
        self._objs: list = []
        self.closed = False

    def _register(self, pd_id: int, seg: segment.Segment, addr: int, length: int, access: int) -> int:
        with self._lock:
            if not self._free:
                raise VerbsError(f"too many memory regions (at most {NSLOTS} per context)")
            slot = self._free.pop()
            self._gen[slot] = (self._gen[slot] + 1) & 0xFFFFF or 1
            rkey = (self._gen[slot] << SLOT_BITS) | slot
            b32, b64 = _slot32(slot), 8 + slot * 8
            t32, t64 = self._t32, self._t64
            t32[b32 + 2], t32[b32 + 3], t32[b32 + 4] = access, seg.fd, pd_id
            t64[b64 + 3], t64[b64 + 4], t64[b64 + 5], t64[b64 + 6] = addr, length, seg.ino, seg.size
            t32[b32] = rkey
            t32[b32 + 1] = 1  # published last
            return rkey

    def _unregister(self, rkey: int) -> None:
        with self._lock:
            slot = rkey & (NSLOTS - 1)
            b32 = _slot32(slot)
            if self._t32[b32] == rkey:
                self._t32[b32 + 1] = 0  # retracted first
                self._t32[b32] = 0
                self._free.append(slot)

    def alloc_pd(self) -> ProtectionDomain:
        pd = ShmPD(self, next(self._pd_ids))
        self._objs.append(pd)
        return pd

    def create_cq(self, depth: int = 1024) -> ShmCQ:
        cq = ShmCQ(self)
        self._objs.append(cq)
        return cq

    # -- hooks for cm.py ---------------------------------------------------------------------
    def _cm_prepare(self, pd: ProtectionDomain, send_cq: ShmCQ, recv_cq: ShmCQ) -> ShmQP:
        if not (isinstance(pd, ShmPD) and pd.ctx is self):
            raise VerbsError("protection domain does not belong to this shm context")
        if not (isinstance(send_cq, ShmCQ) and isinstance(recv_cq, ShmCQ)):
            raise VerbsError("completion queues must come from an shm context")
        qp = ShmQP(self, pd, send_cq, recv_cq, next(self._qpn) & 0xFFFFFF)
        self._objs.append(qp)
        return qp

    def _cm_params(self, qp: ShmQP, sock: socket.socket, initiator: bool) -> dict:
        return qp.params()

    def _cm_complete(self, qp: ShmQP, sock: socket.socket, peer: dict, initiator: bool) -> ShmQP:
        qp.connect(sock, peer)
        return qp

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for obj in reversed(self._objs):
            obj.close()
        self._watcher.close()
        self._table.close_fd()


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
        self._b32[0] = _RTS
        self._ctx._watcher.watch(sock, self._peer_gone)

    # -- remote regions ----------------------------------------------------------------------
    def _map_remote(self, rkey: int) -> tuple | None:
        slot = rkey & (NSLOTS - 1)
        b32, b64 = _slot32(slot), 8 + slot * 8
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
        if self._state is not QPState.RTS or self._pb32[0] != _RTS:
            return self._post_in_err(wr_id, OP_WRITE)
        end = local_offset + length
        if not (
            type(local) is ShmMR
            and local.valid
            and local.pd is self._pd
            and 0 <= local_offset <= end <= local.length
        ):
            return self._fail(wr_id, OP_WRITE, WCStatus.LOC_PROT_ERR)
        ent = self._rcache.get(rkey) or self._map_remote(rkey)
        t32 = self._pt32
        if ent is None or t32[ent[0]] != rkey or t32[ent[0] + 1] != 1 or not ent[3] & _REMOTE_WRITE:
            return self._fail(wr_id, OP_WRITE, WCStatus.REM_ACCESS_ERR)
        off = remote_addr - ent[1]
        if off < 0 or off + length > ent[2]:
            return self._fail(wr_id, OP_WRITE, WCStatus.REM_ACCESS_ERR)
        if imm_data is None:
            ent[4][off : off + length] = local.view[local_offset:end]
        else:
            with self._lock:
                recv = self._take_recv()
                if recv is None:
                    return self._fail(wr_id, OP_WRITE, WCStatus.RNR_RETRY_EXC_ERR)
                ent[4][off : off + length] = local.view[local_offset:end]
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
        if self._state is not QPState.RTS or self._pb32[0] != _RTS:
            return self._post_in_err(wr_id, OP_READ)
        end = local_offset + length
        if not (
            type(local) is ShmMR
            and local.valid
            and local.pd is self._pd
            and local.access & _LOCAL_WRITE
            and 0 <= local_offset <= end <= local.length
        ):
            return self._fail(wr_id, OP_READ, WCStatus.LOC_PROT_ERR)
        ent = self._rcache.get(rkey) or self._map_remote(rkey)
        t32 = self._pt32
        if ent is None or t32[ent[0]] != rkey or t32[ent[0] + 1] != 1 or not ent[3] & _REMOTE_READ:
            return self._fail(wr_id, OP_READ, WCStatus.REM_ACCESS_ERR)
        off = remote_addr - ent[1]
        if off < 0 or off + length > ent[2]:
            return self._fail(wr_id, OP_READ, WCStatus.REM_ACCESS_ERR)
        local.view[local_offset:end] = ent[4][off : off + length]
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
        if self._state is not QPState.RTS or self._pb32[0] != _RTS:
            return self._post_in_err(wr_id, OP_SEND)
        end = local_offset + length
        if not (
            type(local) is ShmMR
            and local.valid
            and local.pd is self._pd
            and 0 <= local_offset <= end <= local.length
        ):
            return self._fail(wr_id, OP_SEND, WCStatus.LOC_PROT_ERR)
        with self._lock:
            recv = self._take_recv()
            if recv is None:
                return self._fail(wr_id, OP_SEND, WCStatus.RNR_RETRY_EXC_ERR)
            r_wr, r_key, r_off, r_len = recv
            ent = self._rcache.get(r_key) or self._map_remote(r_key)
            t32 = self._pt32
            if ent is None or t32[ent[0]] != r_key or t32[ent[0] + 1] != 1 or r_off + r_len > ent[2]:
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
        if not (
            type(local) is ShmMR
            and local.valid
            and local.pd is self._pd
            and local.access & _LOCAL_WRITE
            and 0 <= local_offset
            and 0 <= length
            and local_offset + length <= local.length
        ):
            raise VerbsError("post_recv: buffer outside the region, foreign PD or no LOCAL_WRITE access")
        if self._state is QPState.ERR:
            self._rcq.push(WorkCompletion(wr_id, FLUSH, OP_RECV, self.qp_num))
            return
        b = self._b64
        tail = b[_RQ_TAIL]
        if tail - b[_RQ_HEAD] >= RQ_CAP:
            raise VerbsError(f"receive queue full ({RQ_CAP} entries)")
        i = _RQ + (tail % RQ_CAP) * 4
        b[i], b[i + 1], b[i + 2], b[i + 3] = wr_id, local.rkey, local_offset, length
        b[_RQ_TAIL] = tail + 1

    # -- the peer's queues (requester side) --------------------------------------------------
    def _take_recv(self) -> tuple[int, int, int, int] | None:
        pb = self._pb64
        head = pb[_RQ_HEAD]
        if pb[_RQ_TAIL] == head:
            deadline = time.monotonic() + RNR_TIMEOUT
            while pb[_RQ_TAIL] == head:
                if time.monotonic() > deadline or self._state is not QPState.RTS or self._pb32[0] != _RTS:
                    return None
                time.sleep(0.0002)
        i = _RQ + (head % RQ_CAP) * 4
        r = (pb[i], pb[i + 1], pb[i + 2], pb[i + 3])
        pb[_RQ_HEAD] = head + 1
        return r

    def _deliver(self, wr_id: int, status: int, opcode: int, byte_len: int, imm: int | None) -> bool:
        pb = self._pb64
        tail = pb[_CQ_TAIL]
        if tail - pb[_CQ_HEAD] >= CQ_CAP:
            return False
        i = _CQR + (tail % CQ_CAP) * 4
        flags = int(status) | (int(opcode) << 8) | ((imm is not None) << 16)
        pb[i], pb[i + 1], pb[i + 2], pb[i + 3] = wr_id, flags, byte_len, (imm or 0) & 0xFFFFFFFF
        pb[_CQ_TAIL] = tail + 1
        self._pbell.ring()
        return True

    def _drain_inbound(self) -> None:
        """Source of the receive CQ: completions the peer wrote into our block."""
        b = self._b64
        head, tail = b[_CQ_HEAD], b[_CQ_TAIL]
        if head == tail:
            return
        q = self._rcq._q
        while head != tail:
            i = _CQR + (head % CQ_CAP) * 4
            flags = b[i + 1]
            try:
                status, opcode = WCStatus(flags & 0xFF), WCOpcode((flags >> 8) & 0xFF)
            except ValueError:
                status, opcode = WCStatus.GENERAL_ERR, WCOpcode.RECV
            imm = b[i + 3] if flags >> 16 & 1 else None
            q.append(WorkCompletion(b[i], status, opcode, self.qp_num, b[i + 2], imm))
            head += 1
        b[_CQ_HEAD] = head

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
            self._b32[0] = _ERR
        with self._rcq._src_lock:
            self._drain_inbound()
        b = self._b64
        head, tail = b[_RQ_HEAD], b[_RQ_TAIL]
        b[_RQ_HEAD] = tail
        for n in range(head, tail):
            self._rcq.push(WorkCompletion(b[_RQ + (n % RQ_CAP) * 4], FLUSH, OP_RECV, self.qp_num))
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
            self._b32[0] = _ERR
        if self._sock is not None:
            self._ctx._watcher.unwatch(self._sock)
            self._sock.close()
            self._rcq.remove_source(self._drain_inbound)
        self._blk.close_fd()
        self._rcache = {}
