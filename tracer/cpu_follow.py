"""Keeps a background tracer's thread on the CPU where the thread it traces last ran.

An observing tracer runs at SCHED_IDLE, so it takes only idle CPU. Left to go anywhere, on a
machine of few CPUs it keeps the CPU that the server's clients would use busy, and that slows
the server: beside Redis on these 2-vCPU VMs, a process that does nothing but spin at SCHED_IDLE
costs it about an eighth of its throughput (README, Performance). On the server's own CPU the
tracer runs only while the server waits for input, and the server's wake-ups find that CPU
running instead of halted; what it cannot read then waits in the ring buffer.

It follows only while the batches of events it reads are large (below that it has little to do
anyway) and each comes from one thread. It lets go of that CPU when
half the ring buffer is unread, before the probes would drop anything, and follows again once
the ring is nearly empty: if reading on every idle CPU cannot keep up either, it never follows
again and drops no more than it would have without following.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from . import procfs
from .events import SocketEvent

LOOK_EVERY = 0.02  # seconds between looks at where the traced thread runs
FOLLOW_BATCH = 64  # events in a batch for it to decide where to read
LET_GO_BACKLOG = 1 / 2  # of the ring unread
FOLLOW_AGAIN_BACKLOG = 1 / 16

log = logging.getLogger("tracer")


class CpuFollower:
    """Moves the calling thread (the tracer's); ``update`` runs on it before each read of the
    ring, with the events of the read before."""

    def __init__(self) -> None:
        self._anywhere = os.sched_getaffinity(0)
        self.cpu: int | None = None  # the CPU followed; None: any CPU
        self.let_go = False  # the ring filled: not following until it is nearly empty
        self._next = 0.0

    def update(self, batch: list[SocketEvent], backlog: float | None) -> None:
        """``backlog``: the fraction of the ring buffer unread (None: unknown, do not follow)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + LOOK_EVERY
        if backlog is None or backlog >= LET_GO_BACKLOG:
            self.let_go = True
        elif backlog < FOLLOW_AGAIN_BACKLOG:
            self.let_go = False
        cpu = self.cpu
        if self.let_go:
            cpu = None
        elif len(batch) >= FOLLOW_BATCH:
            tids = {event.tid for event in batch}
            cpu = procfs.last_cpu(tids.pop()) if len(tids) == 1 else None
            if cpu not in self._anywhere:
                cpu = None
        if cpu != self.cpu:
            try:
                os.sched_setaffinity(0, self._anywhere if cpu is None else {cpu})
            except OSError as exc:  # the CPUs this process may use changed under it
                log.warning("reading on any CPU from now on: keeping to CPU %s failed: %s", cpu, exc)
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, self._anywhere)
                self.cpu = None
                self._next = float("inf")
                return
            self.cpu = cpu
