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
  A WRITE posted inside that window lands in the dead peer's memory (still mapped by us, read by
  no one) and completes successfully, like a write an RNIC acknowledged just before the death.
"""

from __future__ import annotations

import itertools
import os
import resource
import selectors
import socket
import threading

from . import metrics, segment
from .shm_layout import NSLOTS, SLOT_BITS, TABLE_SIZE, ShmMR, slot32
from .shm_qp import ShmQP
from .softcq import (
    SoftCQ,
    buffer_address,
    check_length,
)
from .verbs import (
    Access,
    Context,
    MemoryRegion,
    ProtectionDomain,
    VerbsError,
)


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
            b32, b64 = slot32(slot), 8 + slot * 8
            t32, t64 = self._t32, self._t64
            t32[b32 + 2], t32[b32 + 3], t32[b32 + 4] = access, seg.fd, pd_id
            t64[b64 + 3], t64[b64 + 4], t64[b64 + 5], t64[b64 + 6] = addr, length, seg.ino, seg.size
            t32[b32] = rkey
            t32[b32 + 1] = 1  # published last
            return rkey

    def _unregister(self, rkey: int) -> None:
        with self._lock:
            slot = rkey & (NSLOTS - 1)
            b32 = slot32(slot)
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
