"""How a replaying follower that is far behind learns, without its tracer, that the server has
taken an input: a mixin of ``Replayer`` (supervise/replayer.py), on its delivery thread.

Keeping up, the replayer waits for the tracer's reports of the server's reads (and, serializing,
of the reading thread's sleep). Catching up, each of those reports costs two wake-ups, tens of
microseconds each on these VMs and most of an input's replay, so it polls instead, yielding the
CPU between polls, and falls back on the reports when a poll does not answer in time: the
server's end of the connection (borrowed) says how much of it the server has read; serializing,
the probes' maps say how many bytes the server has read in all, which thread read the last of
them and whether that thread has gone back to sleep for more input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .borrowed_socket import bytes_read

if TYPE_CHECKING:
    from .replayer import ReplayConn

# While it catches up, the delivery thread polls the server's end of the connection after writing
# an input, this long, for the server to have read it, before it sleeps until the tracer reports
# the read: each of the two wake-ups of that report costs tens of microseconds on these VMs, most
# of an input's replay. (Not when it keeps up: that CPU is the leader's, where nodes share cores.)
# It yields the CPU between polls: where the copies share cores, a poller that held one kept its
# own server, or another copy's, from running.
CONSUME_SPIN = 0.0003
# Serializing, the same for the server to have read an input and the thread that read it to have
# gone to sleep for more (the probes' counts: _spin_until_finished). Longer: the thread runs the
# input in between.
SERIAL_SPIN = 0.002


class CatchUp:
    """Polls of the server's progress while catching up."""

    _tally: Callable[[], tuple[int, int] | None] | None = None
    _busy: Callable[[int], bool | None] | None = None

    def watch_server(self, tally: Callable[[], tuple[int, int] | None],
                     busy: Callable[[int], bool | None]) -> None:
        """Serializing: read, while catching up, what the probes count of the server's input
        (``tally``: bytes read and the thread that read the last of them) and whether a thread
        is still busy with its input, instead of waiting for the tracer's reports of them."""
        self._tally, self._busy = tally, busy

    def _spin_until_read(self, conn: ReplayConn) -> bool:
        """True once the server has read all that was sent, within CONSUME_SPIN."""
        sock = conn.server_sock
        if sock is None:
            return False
        deadline = time.perf_counter() + CONSUME_SPIN
        while True:
            try:
                conn.read_seen = bytes_read(sock)
            except OSError:
                return False
            if conn.read_seen >= conn.sent:
                return True
            if time.perf_counter() > deadline:
                return False
            os.sched_yield()

    def _spin_until_finished(self, target: int) -> bool:
        """Serializing, catching up: True once the server has read ``target`` bytes in all and
        the thread that read the last of them has gone to sleep for more, within SERIAL_SPIN.
        Only this replayer's inputs are in flight, so the last reader is this input's."""
        assert self._tally is not None and self._busy is not None
        deadline = time.perf_counter() + SERIAL_SPIN
        reader = 0
        while True:
            if not reader:
                tally = self._tally()
                if tally is None:
                    return False
                if tally[0] >= target:
                    tally = self._tally()  # once more: its thread, written before the count
                    if tally is None:
                        return False
                    reader = tally[1]
            if reader:
                busy = self._busy(reader)
                if busy is None:
                    return False
                if not busy:
                    return True
            if time.perf_counter() > deadline:
                return False
            os.sched_yield()
