"""Held threads: each gated input's stop paired with its event, the input read whole from the
stopped thread, and the thread resumed when the caller releases the event or refuses it.

A mixin of ``Tracer`` (tracer/tracer.py), like tasks.py: these methods run on the tracer thread
and share its task table, probes and statistics.
"""

from __future__ import annotations

import logging
import os
import time

from . import ptrace_ops as pt
from . import refusal
from .events import ACCEPTS, MSGHDR, VECTORED, Direction, SocketEvent
from .tasks import Task

log = logging.getLogger("tracer")


class Holding:
    """Pairing, reading, releasing and refusing held inputs."""

    def _held_by_probe(self, event: SocketEvent, thread: Task | None) -> None:
        """An event the probe held: an input whose thread it stopped or whose outputs wait, or an
        output that got past hold-output mode (output_hold.py)."""
        if not event.input:
            self._hold_violated(event)
            return
        if event.stopped and event.dir is Direction.IN and event.ret > len(event.data):
            self._read_held_input(event)
        if event.holds_outputs:
            self._hold_outputs_of(event)
        if not event.stopped or thread is None:
            return
        self._quiet(thread.tid)  # stopped again: done with the input it was let go with
        if event.holds_outputs and thread.gate_stopped:  # its stop came first: arm it and go
            thread.gate_stopped = False
            self._arm_and_go(thread)
            return
        thread.pending = event
        if not event.holds_outputs:
            self.stats.held += 1
            self._spin_until = 0.0  # the input came: from here the thread waits for its release
        self._await_gate_stop(thread)

    def _read_held_input(self, event: SocketEvent) -> None:
        """Read the whole input from the process: a held thread has not run user code since.
        (The thread of an input that is not held has run on: the probe's copy, up to the snap
        length, is all there is of it.)"""
        try:
            if event.call in VECTORED:
                event.data = pt.read_iovecs(event.pid, event.buf, event.count, event.ret)
            elif event.call in MSGHDR:
                event.data = pt.read_msghdr(event.pid, event.buf, event.ret)
            else:
                event.data = pt.read_memory(event.pid, event.buf, event.ret)
        except OSError as exc:
            log.warning("could not read %d input bytes of pid %d: %s", event.ret, event.pid, exc)

    def _escaped(self, thread: Task) -> None:
        assert thread.pending is not None
        lost = thread.pending
        thread.pending = None
        if not lost.released and not lost.holds_outputs:
            self.stats.held -= 1
        self._report_escape(lost, f"thread {thread.tid} of pid {lost.pid} ran on past held "
                                  f"{lost.call.syscall} on fd {lost.fd} without stopping (was it "
                                  "sent SIGCONT?)")

    def _await_gate_stop(self, thread: Task) -> None:
        """Pair the event with its stop if the stop is already there; otherwise its SIGCHLD
        wakes this thread later (spinning here would steal the CPU the held thread needs)."""
        if not thread.gate_stopped:
            tid, status = pt.wait_tid(thread.tid, nohang=True)
            if tid:
                self._on_wait(tid, status)

    def _on_gate_stop(self, thread: Task) -> None:
        if self._idle_poll is not None:
            self._idle_poll.busy(time.monotonic())
        pending = thread.pending
        if pending is not None and (pending.released or pending.holds_outputs):
            thread.pending = None  # released before its stop arrived, or stopped only to be armed
            self._resume_held(thread, pending)
            return
        thread.gate_stopped = True  # its event may still be in the ring buffer

    # ---- releasing --------------------------------------------------------------------------

    def _apply_releases(self) -> None:
        if not self._releases:
            return
        with self._releases_lock:
            todo, self._releases = self._releases, []
        for event in todo:
            self._release_now(event)

    def _release_now(self, event: SocketEvent) -> None:
        if event.holds_outputs:
            self._outputs_released(event)
        elif self.serialize:
            self._serial_release(event)  # goes on once the thread let go before it is done
        else:
            self._resume_released(event)

    def _resume_released(self, event: SocketEvent) -> bool:
        """Let ``event``'s held thread go, now or at its stop; False when it was not held for it
        (gone, already released, or held for another input)."""
        thread = self._threads.get(event.tid)
        if thread is None or thread.pending is not event or event.released:
            return False
        event.released = True
        self.stats.held -= 1
        self.stats.released += 1
        if thread.gate_stopped:
            thread.pending = None
            thread.gate_stopped = False
            self._resume_held(thread, event)
        return True

    def _resume_held(self, thread: Task, event: SocketEvent) -> None:
        if event.holds_outputs:
            self._arm_and_go(thread)
            return
        tid = thread.tid
        if event.refused and not self._take_back(tid, event):
            return
        self._cont(tid, 0)
        if self._resume_spin:
            self._spin_until = time.monotonic() + self._resume_spin

    def _take_back(self, tid: int, event: SocketEvent) -> bool:
        """Make a held syscall fail with ``event.refused``; a refused accept's new descriptor is
        closed in the server too (by the thread), so the server never learns of the connection.
        True when the thread is still held, ready to go on; False when it is gone or another stop
        of it came first (handled here)."""
        try:
            held = refusal.locate(tid, event.pid, event.ret)
            if held is None:
                self._report_escape(event, f"cannot refuse {event.call.syscall} on connection "
                                           f"{event.conn}: thread {tid} stopped neither right "
                                           "after it nor at a signal handler's entry")
                return True
            refusal.set_result(tid, event.pid, held, -event.refused)
            if held.frame_rax is not None:
                log.info("refused %s on connection %d from a signal handler's frame (thread %d)",
                         event.call.syscall, event.conn, tid)
            if event.call not in ACCEPTS:
                return True
            assert self.probes is not None
            self.probes.drop_socket(event.pid, event.ret)  # no close event: the server never had it
            got = refusal.run_syscall(tid, held, refusal.SYS_CLOSE, event.ret)
        except pt.ThreadGone:
            self._forget_thread(tid)
            return False
        except OSError as exc:
            self._report_escape(event, f"cannot refuse {event.call.syscall} on connection "
                                       f"{event.conn}: {exc}")
            return True
        except refusal.InjectFailed as exc:
            log.warning("refused connection %d: fd %d stays open in pid %d: %s", event.conn,
                        event.ret, event.pid, exc)
            self._on_wait(tid, exc.status)
            return False
        if got != 0:
            log.warning("refused connection %d: closing fd %d in pid %d failed: %s", event.conn,
                        event.ret, event.pid, os.strerror(-got))
        return True

    def _report_escape(self, event: SocketEvent, why: str) -> None:
        """The server got an input past the gate: one it was not held for, or a refused one."""
        event.escaped = True
        self.stats.escapes += 1
        log.error("escape: %s", why)
        if self.on_escape is not None:
            self.on_escape(event)
