"""The leader's proposal queue, as methods mixed into Core: proposers never wait for the
consensus lock. They queue the payload, and whoever holds the lock (or gets it without waiting)
drains the queue into one batch, appended (and with fsync, synced) as one. Every holder re-checks
the queue after releasing (``locked``), so nothing queued is stranded. While the leader hands
leadership on (transfer.py), the queue is held: a successor caught up with a log that still grew
would never be caught up.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from consensus import codec
from consensus.codec import Entry
from consensus.commit_future import CommitFuture
from consensus.election import LEADER
from consensus.errors import LogWriteError, NotLeader, ReplicaClosed


class Proposals:
    """Mixed into :class:`consensus.core.Core`."""

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.mu.acquire()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.mu.release()
        # while a hand-over runs, what is queued waits: appended if it is abandoned, failed if
        # leadership passes (_set_role)
        while self._queue and not self.transferring and self.mu.acquire(False):
            try:
                drained = self._drain()
            finally:
                self.mu.release()
            if drained and self.store.fsync:
                self.store.sync()  # group commit of the leader's own copy, outside the lock
                with self.mu:
                    self._advance_commit()

    def submit(self, payload: bytes, defer: bool = False) -> CommitFuture:
        """Queue a proposal; with ``defer``, leave it queued for the next proposal, ``flush`` or
        tick to append, so that a caller with several at hand appends (and syncs) them as one."""
        fut: CommitFuture = CommitFuture()
        if len(payload) > self.max_payload:
            fut.set_exception(ValueError(f"payload of {len(payload)} bytes exceeds {self.max_payload}"))
            return fut
        if self.role != LEADER:
            fut.set_exception(NotLeader(self.leader))
            return fut
        self._queue.append((payload, fut, time.perf_counter()))
        if not defer:
            self.flush()
        return fut

    def flush(self) -> None:
        """Append what is queued, unless the lock's holder will."""
        if self._queue and self.mu.acquire(False):
            self._release()

    def _drain(self) -> bool:
        if self.transferring:
            return False
        q = self._queue
        batch = []
        while q:
            batch.append(q.popleft())
        if not batch:
            return False
        if self.role != LEADER:
            exc = NotLeader(self.leader)
            for _, fut, _ in batch:
                fut.set_exception(exc)
            return False
        first = self.store.last_index + 1
        b = self.ballot
        entries = [Entry(first + k, b, codec.KIND_DATA, p) for k, (p, _, _) in enumerate(batch)]
        try:
            self.store.append(entries)
        except LogWriteError:
            closed = ReplicaClosed("replica not running: its log cannot be written")
            for _, fut, _ in batch:
                fut.set_exception(closed)
            raise
        pend = self._pending
        for k, (_, fut, t0) in enumerate(batch):
            pend[first + k] = (fut, t0)
        now = time.monotonic()
        for p in self._eager(now):
            if p not in self.inflight:
                self._replicate(p, now)
        return True

    def _fail_pending(self, exc: Exception) -> None:
        pend, self._pending = self._pending, {}
        for fut, _ in pend.values():
            if not fut.done():
                fut.set_exception(exc)
        while self._queue:
            _, fut, _ = self._queue.popleft()
            fut.set_exception(exc)
