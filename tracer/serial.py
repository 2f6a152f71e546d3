"""Serialized releases: a multi-threaded server takes its held inputs one at a time.

Gate mode holds each input's thread until the caller releases it. Threads released one after
another then run side by side, and two of them acting on the same data (two memcached workers
on one key) do so in whichever order the scheduler picks, which differs between copies of the
server. With ``Tracer(serialize=True)`` a released thread goes on only once the thread released
before it has finished with its input: it went to sleep waiting for more input (in epoll_wait,
poll, select, a blocking read or accept: the sched_switch probe reports that as a Call.SLEEP
event), it stopped at its next held input, or it exited. Releases otherwise keep the order in
which the caller made them, which for a supervisor is log order. A follower's replayer waits for
the same report before it sends the next input (supervise/replayer.py), so every copy takes its
inputs one at a time, in log order.

A thread that waits for a lock in the middle of an input has not finished. One that neither
sleeps so nor stops within SERIAL_TIMEOUT (it polls for input without sleeping, or waits for a
lock that a held thread holds) is not waited for any longer, with a warning: the next input goes
on beside it, as without serializing (output checking reports a copy that came out different).
A thread that hands its input to another thread and goes back to waiting counts as finished.

A mixin of ``Tracer`` (tracer/tracer.py), like holding.py: these methods run on the tracer thread,
but for ``input_tally`` and ``thread_busy``, which read the probes' maps for a follower's replayer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .events import SocketEvent

if TYPE_CHECKING:
    from .probes import Probes

T = TypeVar("T")

log = logging.getLogger("tracer")

SERIAL_TIMEOUT = 0.5


class Serializing:
    """The queue of released inputs and the thread that runs the last one let go."""

    def _init_serial(self, serialize: bool) -> None:
        self.serialize = serialize
        self._serial_queue: deque[SocketEvent] = deque()
        self._serial_tid = 0  # the thread let go last, until it has finished with its input
        self._serial_since = 0.0

    def _serial_release(self, event: SocketEvent) -> None:
        self._serial_queue.append(event)

    def _quiet(self, tid: int) -> None:
        """``tid`` slept, stopped at a held input or is gone: it has finished with its input."""
        if tid == self._serial_tid:
            self._serial_tid = 0

    def _serial_pump(self, now: float) -> None:
        """Let the next released thread go once the one before it has finished."""
        if self._serial_tid and now - self._serial_since > SERIAL_TIMEOUT:
            self.stats.serial_timeouts += 1
            log.warning("thread %d neither slept nor stopped within %.1fs of its release: the next "
                        "input goes on beside it (serializing needs a server whose threads sleep "
                        "between inputs)", self._serial_tid, SERIAL_TIMEOUT)
            self._serial_tid = 0
        while not self._serial_tid and self._serial_queue:
            event = self._serial_queue.popleft()
            if self._resume_released(event):
                self._serial_tid = event.tid
                self._serial_since = now

    # ---- for a replaying follower's thread (any thread may ask) --------------------------------

    def input_tally(self, tgid: int) -> tuple[int, int] | None:
        """Bytes ``tgid`` has read from its tracked connections since the probes loaded, and the
        thread that read the last of them; None before its first read, or while the probes close."""
        return self._read_serial_maps(lambda probes: probes.input_tally(tgid))

    def thread_busy(self, tid: int) -> bool | None:
        """Whether ``tid`` took input and has not gone to sleep for more since (it is finished
        with its input once it has); None while the probes close."""
        return self._read_serial_maps(lambda probes: probes.thread_busy(tid))

    def _read_serial_maps(self, read: Callable[[Probes], T]) -> T | None:
        probes = self.probes
        if probes is None or probes.busy is None:
            return None
        try:
            return read(probes)
        except (KeyError, OSError, ValueError):  # the tracer thread is closing them right now
            return None
