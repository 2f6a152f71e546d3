"""Hold-output mode: a server's inputs run on at once, and its outputs wait until every input it
read before them is released (committed, for a supervisor).

A single-threaded server reads one client at a time, so holding each input until its commit
serves one commit at a time. Here the server reads every client that is ready, and the thread
stops only when it is about to write, at a hardware breakpoint on libc's output functions
(breakpoints.py): by then the tracer has its inputs, whose commits then go together. Nothing a
client sees can come from an input the log may not hold.

Each thread is *armed* (its breakpoints on) or not. An input of a thread that is not armed stops
it (the probe sends SIGSTOP, as in gate mode) and the tracer arms it and lets it go; an input
of an armed thread does not stop it, unless the probe could not copy the input whole. At its
next output the armed thread traps; once every input read so far is released (by any traced
process: a child may write what its parent read), the tracer disarms it and lets it go, and its
outputs then run free until its next input. So a thread stops twice for a whole batch of
inputs. A thread or process created while outputs are held starts armed; one that execs waits
at the exec, as at an output, since exec drops its breakpoints.

The probes report what this cannot hold (``Hold.MISSED``, ``Hold.CROSSED``): an output that
bypassed libc's functions, or one by a disarmed thread after another thread's later input (a
server whose threads share what they serve). Either is reported as an escape, and the tracer
holds inputs (gate mode) from then on.

A mixin of ``Tracer`` (tracer/tracer.py): these methods run on the tracer thread.
"""

from __future__ import annotations

import logging
import time

from . import breakpoints
from . import ptrace_ops as pt
from .events import Hold, SocketEvent
from .tasks import Mode, Task

log = logging.getLogger("tracer")


class OutputHolding:
    """Arming, trapping and disarming threads, and the inputs their outputs wait for."""

    def _init_output_hold(self) -> None:
        self._unreleased: dict[int, dict[int, SocketEvent]] = {}  # tgid -> seq -> input
        self._armed: set[int] = set()
        self._loaded: set[int] = set()  # threads whose address registers hold their entries
        self._entries: dict[int, list[int]] = {}  # tgid -> its libc's output functions
        self._trapped: dict[int, int | None] = {}  # tid -> the seq its output waits through
        self._last_seq = 0

    def _can_hold_outputs(self) -> str | None:
        """Why the traced processes' outputs cannot be held, or None when they can."""
        for tgid in list(self._tgids):
            try:
                self._entries[tgid] = breakpoints.output_entries(tgid)
            except (OSError, breakpoints.NoOutputCalls) as exc:
                return str(exc)
        return None

    def _hold_outputs_of(self, event: SocketEvent) -> None:
        self._unreleased.setdefault(event.pid, {})[event.seq] = event

    def _outputs_released(self, event: SocketEvent) -> None:
        if event.released:
            return
        event.released = True
        self.stats.released += 1
        if event.refused:  # it stays unreleased: no output its process makes from now on goes out
            self._report_escape(event, f"{event.call.syscall} on connection {event.conn} cannot be "
                                       "refused: the server consumed it at once (outputs were "
                                       "held, not inputs); its process's outputs stay held")
            return
        waiting = self._unreleased.get(event.pid)
        if waiting is not None:
            waiting.pop(event.seq, None)

    def _arm_and_go(self, thread: Task) -> None:
        """A thread stopped for an input of hold-output mode: arm it and let it go."""
        try:
            if thread.tid not in self._armed:
                entries = self._entries.get(thread.tgid)
                if entries is None:
                    entries = self._entries[thread.tgid] = breakpoints.output_entries(thread.tgid)
                if thread.tid not in self._loaded:
                    breakpoints.load(thread.tid, entries)
                    self._loaded.add(thread.tid)
                breakpoints.switch(thread.tid, True)
                self._armed.add(thread.tid)
                assert self.probes is not None
                self.probes.set_armed(thread.tid, True)
        except pt.ThreadGone:
            self._forget_thread(thread.tid)
            return
        except (OSError, breakpoints.NoOutputCalls) as exc:
            log.error("cannot hold the outputs of thread %d (pid %d): %s; holding inputs instead",
                      thread.tid, thread.tgid, exc)
            self.set_mode(Mode.GATE)
        self._cont(thread.tid, 0)

    def _on_first_stop(self, thread: Task) -> None:
        """A thread or process created while traced, stopped before it runs: armed from the
        start, since what it writes may come of inputs its creator read that are not released
        yet (a forked child's greeting, say)."""
        if self.mode is Mode.HOLD_OUTPUT:
            self._arm_and_go(thread)
        else:
            self._cont(thread.tid, 0)

    def _on_exec_done(self, thread: Task) -> None:
        """A process that exec'd has no breakpoints, and its new libc is not mapped yet: it
        waits, as at an output, until every input read so far is released. It is armed again at
        its next input."""
        if self.mode is Mode.HOLD_OUTPUT:
            self._trapped[thread.tid] = None
        else:
            self._cont(thread.tid, 0)

    def _inherit_output_entries(self, child: int, parent: int) -> None:
        """A forked child has its parent's libc where its parent had it."""
        if parent in self._entries:
            self._entries[child] = self._entries[parent]

    def _on_trap(self, thread: Task) -> None:
        """The thread reached an output function while armed; what it waits for is known once
        the ring is read past its trap (_resolve_traps)."""
        if self._idle_poll is not None:
            self._idle_poll.busy(time.monotonic())
        self.stats.output_stops += 1
        self._trapped[thread.tid] = None

    def _resolve_traps(self) -> None:
        """Let go each trapped thread when no input read before its trap waits for release. Any
        traced process's input counts: a process may have been forked after its parent read one."""
        if not self._trapped:
            return
        if None in self._trapped.values():
            self._pump_events()  # every input read before the trap is in the ring by now
            for tid, upto in self._trapped.items():
                if upto is None:
                    self._trapped[tid] = self._last_seq
        oldest = min((min(waiting) for waiting in self._unreleased.values() if waiting),
                     default=None)
        for tid, upto in list(self._trapped.items()):
            if tid not in self._threads:
                del self._trapped[tid]
                continue
            if oldest is not None and oldest <= upto:
                continue
            del self._trapped[tid]
            if self._disarm(tid, upto):
                self._cont(tid, 0)

    def _disarm(self, tid: int, committed_seq: int) -> bool:
        try:
            breakpoints.switch(tid, False)
        except pt.ThreadGone:
            self._forget_thread(tid)
            return False
        self._armed.discard(tid)
        assert self.probes is not None
        self.probes.set_armed(tid, False, committed_seq)
        return True

    def _hold_violated(self, event: SocketEvent) -> None:
        if event.hold is Hold.MISSED:
            why = (f"thread {event.tid} of pid {event.pid} wrote to connection {event.conn} with "
                   f"{event.call.syscall} past its output breakpoints (a call libc's write, writev, "
                   "send and sendmsg do not make)")
        else:
            why = (f"thread {event.tid} of pid {event.pid} wrote to connection {event.conn} after "
                   "another of its threads read input that may not be committed yet")
        if self.mode is Mode.HOLD_OUTPUT:
            self.set_mode(Mode.GATE)
        self._report_escape(event, why + "; holding inputs from now on")

    def _forget_breakpoints(self, tid: int) -> None:
        self._armed.discard(tid)
        self._loaded.discard(tid)
        self._trapped.pop(tid, None)

    def _forget_process_outputs(self, tgid: int) -> None:
        """The process exited: nothing of it waits any more (a late release finds nothing)."""
        self._unreleased.pop(tgid, None)
        self._entries.pop(tgid, None)

    def _breakpoints_dropped_by_exec(self, tgid: int) -> None:
        """exec cleared the process's breakpoints and may have mapped another libc."""
        self._entries.pop(tgid, None)
        for tid, thread in self._threads.items():
            if thread.tgid == tgid and tid in self._loaded:
                self._forget_breakpoints(tid)
                assert self.probes is not None
                self.probes.set_armed(tid, False, self._last_seq)

    def _clear_breakpoints(self, tid: int) -> None:
        """Before a stopped thread is detached: the kernel would keep them."""
        if tid in self._loaded:
            try:
                breakpoints.switch(tid, False)
            except pt.ThreadGone:
                pass
        self._forget_breakpoints(tid)
