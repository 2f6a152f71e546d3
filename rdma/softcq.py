"""Pieces shared by the software providers (shm, tcp): completion queue, memory region, helpers."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable

from .futex import Doorbell
from .verbs import Access, CompletionQueue, MemoryRegion, VerbsError, WCOpcode, WCStatus, WorkCompletion

# Longest single futex sleep: wait() re-checks its sources at least this often (a safety net only;
# wakeups are not lost, see futex.py).
_MAX_SLEEP = 0.5


def buffer_address(mm: mmap.mmap) -> int:
    """Virtual address of an mmap's first byte (the ``addr`` peers use, as with real verbs)."""
    c = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class SoftCQ(CompletionQueue):
    """A completion queue fed by local producers (``push``) and by polled ``sources``.

    Sources are callables that move completions from elsewhere (a ring written by a peer process)
    into this queue. ``wait`` polls for ``spin`` seconds, then sleeps on a futex doorbell that every
    producer rings, so an idle queue burns no core. The doorbell word may live in shared memory so
    that other processes can ring it.
    """

    def __init__(self, bell_buffer, spin: float = 30e-6) -> None:
        self._q: deque[WorkCompletion] = deque()
        self._sources: list[Callable[[], None]] = []
        self._src_lock = threading.RLock()  # a source may remove itself (QP error) while polled
        self._bell = Doorbell(bell_buffer, 0)
        self._sleepers = 0
        self._sleep_lock = threading.Lock()
        self._spin = spin
        self.closed = False

    # -- producers -------------------------------------------------------------------------
    def push(self, wc: WorkCompletion) -> None:
        """Append a completion from any thread of this process and wake a sleeping waiter."""
        self._q.append(wc)
        if self._sleepers:
            self._wake()

    def _wake(self) -> None:
        self._bell.ring()

    def _sleep(self, seq: int, timeout: float) -> None:
        self._bell.sleep(seq, timeout)

    def add_source(self, source: Callable[[], None]) -> None:
        with self._src_lock:
            self._sources = [*self._sources, source]

    def remove_source(self, source: Callable[[], None]) -> None:
        with self._src_lock:
            self._sources = [s for s in self._sources if s is not source]

    # -- consumers -------------------------------------------------------------------------
    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        if self._sources and self._src_lock.acquire(False):
            try:
                for src in self._sources:
                    src()
            finally:
                self._src_lock.release()
        q = self._q
        if not q:
            return []
        out = []
        try:
            while len(out) < max_entries:
                out.append(q.popleft())
        except IndexError:
            pass
        return out

    def wait(self, timeout: float | None = None, max_entries: int = 16,
             spin: float | None = None) -> list[WorkCompletion]:
        out = self.poll(max_entries)
        if out or self.closed:
            return out
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin = self._spin if spin is None else spin
        if spin:
            spin_end = now + min(spin, timeout if timeout is not None else spin)
            while time.monotonic() < spin_end:
                out = self.poll(max_entries)
                if out:
                    return out
        while not self.closed:
            with self._sleep_lock:
                self._sleepers += 1
            try:
                seq = self._bell.seq
                out = self.poll(max_entries)
                if out:
                    return out
                if deadline is None:
                    remaining = _MAX_SLEEP
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                self._sleep(seq, min(remaining, _MAX_SLEEP))
            finally:
                with self._sleep_lock:
                    self._sleepers -= 1
        return []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake()


_LOCAL_WRITE = int(Access.LOCAL_WRITE)


class SoftMR(MemoryRegion):
    """A region backed by an mmap (anonymous for tcp, a shared segment for shm)."""

    def __init__(self, pd: object, mm: mmap.mmap, length: int, access: Access, key: int) -> None:
        self.pd = pd
        self._mm = mm
        self.length = length
        self.access = Access(access)
        self.access_bits = int(self.access)  # for hot paths: Flag arithmetic costs a microsecond
        self.lkey = self.rkey = key
        self.addr = buffer_address(mm)
        self.view = memoryview(mm)[:length]
        self.valid = True

    @property
    def buf(self) -> memoryview:
        return self.view

    @classmethod
    def grants(cls, local: MemoryRegion, pd: object, offset: int, length: int, need_write: bool) -> bool:
        """The local protection check of every work request: ``local`` is a region of this
        provider, still registered with ``pd``, spans [offset, offset + length), and is locally
        writable when ``need_write``."""
        return (type(local) is cls and local.valid and local.pd is pd
                and 0 <= offset <= offset + length <= local.length
                and (not need_write or local.access_bits & _LOCAL_WRITE))

    def close(self) -> None:
        if not self.valid:
            return
        self.valid = False
        self.pd._dereg(self)  # type: ignore[attr-defined]


def check_length(length: int) -> None:
    if length <= 0:
        raise VerbsError(f"memory region length must be positive, got {length}")


SUCCESS = WCStatus.SUCCESS
FLUSH = WCStatus.WR_FLUSH_ERR
OP_WRITE = WCOpcode.RDMA_WRITE
OP_READ = WCOpcode.RDMA_READ
OP_SEND = WCOpcode.SEND
OP_RECV = WCOpcode.RECV
OP_RECV_IMM = WCOpcode.RECV_RDMA_WITH_IMM
