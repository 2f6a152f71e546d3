"""Capture and gate a process's socket syscalls from outside it.

One thread, the tracer thread, owns every ptrace call. It waits (epoll) on the BPF ring buffer,
a SIGCHLD signalfd and a wake-up eventfd, pairs each gated input event with the SIGSTOP that
the probe sent its thread, and restarts the thread when the caller releases the event.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from . import ptrace_ops as pt
from .connections import ConnectionTracking
from .cpu_follow import CpuFollower
from .events import ACCEPTS, Call, Direction, Hold, SocketEvent, format_sockaddr
from .holding import Holding
from .idle_poll import IdlePolling
from .output_hold import OutputHolding
from .probes import Probes
from .serial import Serializing
from .signalfd import SigchldFd
from .tasks import AttachError, Mode, Task, TaskControl, TracerStats, check_attachable

__all__ = ["AttachError", "Mode", "Tracer", "TracerStats", "check_attachable"]

log = logging.getLogger("tracer")

BACKSTOP_SECONDS = 0.02
GATE_SPIN_SECONDS = 0.0002
BATCHED_POLL_SECONDS = 0.001
_CALLS = {c.value: c for c in Call}
_DIRECTIONS = tuple(Direction)
# _on_raw_event builds events positionally (keywords cost a fifth of an event's construction)
assert [f.name for f in dataclasses.fields(SocketEvent)] == [
    "seq", "t", "pid", "tid", "call", "fd", "ret", "conn", "dir", "input", "gated", "data", "peer",
    "escaped", "released", "refused", "buf", "count", "last", "hold"], "update Tracer._on_raw_event"
_HOLDS = tuple(Hold)


class Tracer(TaskControl, ConnectionTracking, Holding, OutputHolding, Serializing):
    """Attach to (or launch) a process and report its socket events.

    ``on_event`` is called on the tracer thread for every event; it must not block. In gate
    mode each input event's thread stays stopped until ``release(event)``, which any thread may
    call; in hold-output mode the thread runs on, and its outputs wait until then. Either way
    such events have ``gated`` set. ``on_exit(status)`` is called when the traced process is
    gone.
    """

    def __init__(
        self,
        mode: Mode,
        on_event: Callable[[SocketEvent], None],
        snaplen: int = 4096,
        on_exit: Callable[[int | None], None] | None = None,
        on_escape: Callable[[SocketEvent], None] | None = None,
        on_batch: Callable[[], None] | None = None,
        exitkill: bool | None = None,
        background: bool = False,
        idle_poll: bool = True,
        resume_spin: float = GATE_SPIN_SECONDS,
        serialize: bool = False,
        probes: Probes | None = None,
    ) -> None:
        """``on_batch``: called on the tracer thread after each batch of events read at once
        (one for each trap in hold-output mode), for a caller that acts on them together.
        ``idle_poll``: while held inputs flow, or events flow with batched wake-ups, keep the
        machine's idle CPUs polling instead of halting (see tracer/idle_poll.py): faster gating
        and catch-up, at the price of idle cores that spin meanwhile and a moment after.
        ``resume_spin``: seconds the tracer thread polls without sleeping after it resumes a
        held thread, whose next input comes soon; 0 where other processes need the CPU more (a
        supervisor's followers). ``serialize``: let released threads go one at a time, each once the one
        before it has finished with its input (tracer/serial.py); SLEEP events, which say a
        thread did, go to ``on_event`` too. ``probes``: loaded probes (of this ``snaplen`` and
        ``serialize``) to use instead of compiling them, which takes seconds; the tracer resets
        them when it lets go, and the caller closes them."""
        self.mode = mode
        self.exitkill = mode.holds if exitkill is None else exitkill
        self.background = background
        self.on_event = on_event
        self.on_exit = on_exit
        self.on_escape = on_escape
        self.on_batch = on_batch
        self.snaplen = snaplen
        self.stats = TracerStats()
        self.pid = 0
        self._threads: dict[int, Task] = {}
        self._tgids: set[int] = set()
        self._init_connections()
        self._releases: list[SocketEvent] = []
        self._releases_lock = threading.Lock()
        # held to change the mode, to give a new process its mode and to close the probes
        self._mode_lock = threading.RLock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._thread_ident = 0
        self._batch: list[SocketEvent] = []
        self._batch_before: list[SocketEvent] = []  # the last read's events
        self._clock_offset = time.time() - time.monotonic()
        self.probes: Probes | None = None
        if probes is not None and (probes.snaplen, probes.serialize) != (snaplen, serialize):
            raise ValueError("the probes given were compiled for another snap length or serializing")
        self._given_probes = probes
        self._idle_poll = IdlePolling() if idle_poll else None
        self._resume_spin = resume_spin
        self._init_output_hold()
        self._init_serial(serialize)

    # ---- public API -------------------------------------------------------------------------

    def attach(self, pid: int, timeout: float = 120.0) -> None:
        """Seize every thread of a running process; returns once gating is in force."""
        check_attachable(pid)
        self._start(lambda: self._attach(pid), timeout)

    def launch(self, argv: Sequence[str], timeout: float = 120.0) -> int:
        """Start ``argv`` under the tracer; returns its pid."""
        self._start(lambda: self._launch(list(argv)), timeout)
        return self.pid

    def release(self, event: SocketEvent) -> None:
        """Let the thread held for ``event`` return from its syscall. Releases take effect in
        the order they are made, from whichever threads (which serializing relies on)."""
        if threading.get_ident() == self._thread_ident:
            self._apply_releases()  # those that other threads made before this one
            self._release_now(event)
            return
        with self._releases_lock:
            wake = not self._releases  # else a wake-up is on its way for those before
            self._releases.append(event)
        if wake:
            os.eventfd_write(self._wake_fd, 1)

    @property
    def threads_held(self) -> int:
        """Threads stopped until a release: at a held input, or at an output (hold-output mode)."""
        return self.stats.held + len(self._trapped)

    @property
    def lost_events(self) -> int:
        """Events the probes could not queue because this tracer fell behind."""
        probes = self.probes
        if probes is not None:
            try:
                return probes.lost_events()
            except (KeyError, OSError, ValueError):  # the tracer thread is closing them right now
                pass
        return self.stats.bpf_lost

    def set_mode(self, mode: Mode, *, resume_outputs_held: bool = False) -> None:
        """Start or stop gating. A supervisor that may gate later attaches with exitkill=True,
        since PTRACE_O_EXITKILL can only be set while every thread is stopped. Hold-output mode
        holds connections accepted from now on (a new leadership's), and with
        ``resume_outputs_held`` those it held before a spell in gate mode too (the same
        leadership going on); it falls back to gate mode for a process without output calls."""
        if mode.holds and not self.exitkill:
            raise ValueError("gating needs a tracer attached with exitkill")
        with self._mode_lock:  # the tracer thread may be closing the probes as the server exits
            if mode is Mode.HOLD_OUTPUT and self.probes is not None:
                why = self._can_hold_outputs()
                if why is not None:
                    log.warning("cannot hold outputs (%s): holding inputs instead", why)
                    mode = Mode.GATE
                elif not resume_outputs_held:
                    self.probes.end_outputs_held()
            self.mode = mode
            self._apply_bpf_mode()
            if self.probes is not None:
                self._sync_idle_poll()

    def set_batched_wakeups(self, on: bool) -> None:
        """Observe mode: with ``on``, the probes wake the tracer thread once per batch of events
        (and at once for a connection's start and end) instead of for each, and it reads them
        every BATCHED_POLL_SECONDS. For a caller that does not wait on each input's report for a
        while, such as a follower replaying a backlog: each wake-up costs the traced thread a
        VM exit, and the tracer thread a switch and the GIL."""
        if self.batched_wakeups == on:
            return
        with self._mode_lock:  # the mode and this decide the idle-polling request together
            self.batched_wakeups = on
            self._poll_seconds = BATCHED_POLL_SECONDS if on else BACKSTOP_SECONDS
            self._apply_bpf_mode()
            self._sync_idle_poll()
        os.eventfd_write(self._wake_fd, 1)  # read what waits now: behind it, the ring wakes nobody

    def _apply_bpf_mode(self) -> None:
        """Tell the probes the mode every traced process is in now."""
        with self._mode_lock:
            if self.probes is not None:
                for tgid in list(self._tgids):
                    self.probes.supervise_tgid(tgid, self._bpf_mode())

    def _sync_idle_poll(self) -> None:
        if self._idle_poll is None:
            return
        if (self.mode.holds or self.batched_wakeups) and self.probes is not None and \
                not self._stopping.is_set():
            self._idle_poll.allow()  # held from the next held input (holding.py) or batch on
        else:
            self._idle_poll.forbid()

    def refuse(self, event: SocketEvent, error: int = errno.ECONNRESET) -> None:
        """Let the held thread go on, but with its input taken back: the syscall fails with
        ``error`` instead, so the server drops that connection without having seen the bytes.
        A refused accept also has its new descriptor closed in the server (the thread runs a
        close before it goes on), so the server never learns of the connection; no close event
        is reported for it. See tracer/refusal.py.

        In hold-output mode the server has consumed the input already: the refusal is reported
        as an escape, and its process's outputs stay held from then on, until it exits or is
        detached (which lets them go: a caller should kill it, or exit without detaching and
        let PTRACE_O_EXITKILL kill it)."""
        event.refused = error
        self.release(event)

    def detach(self, timeout: float = 10.0) -> None:
        """Release every thread, remove the probes and leave the process running."""
        self._stopping.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the tracer thread ends (detach or process exit)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- tracer thread ----------------------------------------------------------------------

    def _start(self, setup: Callable[[], None], timeout: float) -> None:
        self._thread = threading.Thread(target=self._main, args=(setup,), name="tracer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.detach()
            raise AttachError("attaching took too long; the target may be stopped or frozen")
        if self._error is not None:
            self._thread.join(5)
            raise self._error

    def _main(self, setup: Callable[[], None]) -> None:
        self._thread_ident = threading.get_ident()
        sigchld = SigchldFd()
        try:
            self.probes = self._given_probes or Probes(self.snaplen, self.serialize)
            # the mapped reader only where nothing is replicated: it is newer than libbpf's
            ring_fd = self.probes.open_events(self._on_raw_event, mapped=self.background)
            setup()
        except BaseException as exc:  # reported to the caller of attach()/launch()
            self._error = exc if isinstance(exc, (AttachError, pt.ThreadGone)) else AttachError(str(exc))
            self._teardown_probes()
            sigchld.close()
            self._ready.set()
            return
        if self.background:
            # an observer must never slow the server: it runs on idle CPU (the server's own, where
            # it can: cpu_follow.py) and counts what it lost. Only once attached: on a busy
            # machine, compiling the probes at SCHED_IDLE could take minutes
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            self._follower = CpuFollower()
        self._sync_idle_poll()
        self._ready.set()
        poller = select.epoll()
        for fd in (ring_fd, sigchld.fd, self._wake_fd):
            poller.register(fd, select.EPOLLIN)
        exit_status: int | None = None
        reaped = 0.0
        try:
            while not self._stopping.is_set() and self._tgids:
                # after resuming a held thread, poll without sleeping for a moment: its next
                # input comes soon, and a wake-up from sleep costs tens of microseconds on a VM.
                # (Not while a thread waits for its release: on a supervisor that is a commit,
                # hundreds of microseconds of CPU that the followers need.)
                spinning = time.monotonic() < self._spin_until
                ready = {fd for fd, _ in poller.poll(0 if spinning else self._poll_seconds)}
                if not ready and not spinning:
                    self._forget_vanished_processes()
                if sigchld.fd in ready:
                    sigchld.drain()
                if self._wake_fd in ready:
                    self._drain_wake()
                self._pump_events()
                # a tracee's stop raises SIGCHLD; waiting on every pass (a syscall for each
                # event an observer reads) only backs up a SIGCHLD another thread took
                now = time.monotonic()
                if sigchld.fd in ready or now - reaped >= BACKSTOP_SECONDS:
                    reaped = now
                    self._reap_all()
                self._apply_releases()
                if self.serialize:
                    self._serial_pump(now)
                self._resolve_traps()
                if self._idle_poll is not None:
                    self._idle_poll.expire(now)
            if self._tgids:
                self._detach_all()
            else:
                # its last events; not the ends of its connections, which on_exit implies (reported
                # one by one, each would look to a caller like the server closing a connection)
                self._gone.clear()
                self._pump_events()
                exit_status = self._exit_status
        except Exception:
            if self.mode.holds:
                self._kill_on_failure()
            else:
                log.exception("tracer thread failed; detaching")
                self._detach_all()
            raise
        finally:
            poller.close()
            sigchld.close()
            self._teardown_probes()
            if not self._stopping.is_set() and self.on_exit is not None:
                self.on_exit(exit_status)

    _exit_status: int | None = None
    _follower: CpuFollower | None = None
    _spin_until = 0.0  # the loop polls without sleeping until then (set on resuming a held thread)
    _poll_seconds = BACKSTOP_SECONDS  # the loop's longest sleep (see set_batched_wakeups)

    def _forget_vanished_processes(self) -> None:
        """Backstop for an exit whose notification was missed: the process is gone from /proc."""
        for tgid in list(self._tgids):
            if not os.path.exists(f"/proc/{tgid}"):
                log.warning("pid %d is gone without an exit notification", tgid)
                self._tgids.discard(tgid)
                for tid in [t for t, task in self._threads.items() if task.tgid == tgid]:
                    self._forget_thread(tid)

    def _teardown_probes(self) -> None:
        with self._mode_lock:
            probes = self.probes
            if probes is not None:
                self.stats.bpf_lost = probes.lost_events()
                self.probes = None  # before closing: other threads read lost_events meanwhile
                if probes is self._given_probes:
                    probes.reset()
                else:
                    probes.close()
            self._sync_idle_poll()

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    # ---- events -----------------------------------------------------------------------------

    def _on_raw_event(self, header: tuple, data: bytes) -> None:
        (ts_ns, seq, conn, ret, buf, count, tgid, tid, call_nr, fd, _, dir_nr, gated, is_input,
         peer_len, peer_raw) = header
        call = _CALLS[call_nr]
        peer = format_sockaddr(peer_raw[:peer_len]) if peer_len and call in ACCEPTS else None
        self._batch.append(SocketEvent(
            seq, ts_ns / 1e9 + self._clock_offset, tgid, tid, call, fd, ret, conn,
            _DIRECTIONS[dir_nr], is_input == 1, 0 < gated < Hold.MISSED, data, peer, False, False, 0,
            buf, count, True, _HOLDS[gated]))

    def _pump_events(self) -> None:
        assert self.probes is not None
        if self._follower is not None:  # first: it lets go of a CPU that leaves it too little time
            self._follower.update(self._batch_before, self.probes.backlog())
        gone = self._gone  # their processes' events are all in the ring now
        if gone:
            self._gone = []
        self.probes.consume()
        batch, self._batch = self._batch, []
        if batch and self.batched_wakeups and self._idle_poll is not None:
            self._idle_poll.busy(time.monotonic())
        for event in batch:
            self._handle(event)
        if gone:
            self._report_gone(gone)
        if (batch or gone) and self.on_batch is not None:
            self.on_batch()
        if self._follower is not None:
            self._batch_before = batch

    def _handle(self, event: SocketEvent) -> None:
        if event.call is Call.SLEEP:
            self._quiet(event.tid)
            self.on_event(event)
            return
        self.stats.events += 1
        self._track_connection(event)
        if event.seq > self._last_seq:
            self._last_seq = event.seq
        if event.input:
            self.stats.inputs += 1
        thread = self._threads.get(event.tid)
        if thread is not None and thread.pending is not None and not thread.gate_stopped:
            self._escaped(thread)
        if event.call is Call.CLOSE_RANGE and not event.conn:  # the range: its sockets follow
            self._on_close_range(event, thread)
            return
        if event.hold:
            self._held_by_probe(event, thread)
        self.on_event(event)
