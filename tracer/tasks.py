"""The seized tasks of a traced process: attaching, ptrace stops, detaching.

A mixin of ``Tracer`` (tracer/tracer.py): these methods run on the tracer thread, which owns
every ptrace call, and share the tracer's task table, probes and statistics.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum

from . import breakpoints, procfs
from . import ptrace_ops as pt
from .events import SocketEvent
from .probes import MODE_GATE, MODE_HOLD_OUTPUT, MODE_OBSERVE, MODE_TRACE, SOCK_CONN, SOCK_LISTEN

log = logging.getLogger("tracer")

STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class Mode(Enum):
    OBSERVE = "observe"
    GATE = "gate"  # each input's thread is held until the input is released
    HOLD_OUTPUT = "hold-output"  # inputs run on; outputs wait until the inputs are (output_hold.py)

    @property
    def holds(self) -> bool:
        return self is not Mode.OBSERVE


class AttachError(Exception):
    """The target cannot be attached; the message is one line for the operator."""


@dataclass
class TracerStats:
    events: int = 0
    inputs: int = 0
    held: int = 0
    released: int = 0
    escapes: int = 0
    threads: int = 0
    bpf_lost: int = 0
    output_stops: int = 0  # hold-output mode: threads stopped at an output (one per batch)
    serial_timeouts: int = 0  # serializing: threads not waited for any longer (serial.py)


class Task:
    """What the tracer knows about one seized thread."""

    __slots__ = ("tid", "tgid", "gate_stopped", "pending", "unborn")

    def __init__(self, tid: int, tgid: int, unborn: bool = False) -> None:
        self.tid = tid
        self.tgid = tgid
        self.gate_stopped = False
        self.pending: SocketEvent | None = None
        self.unborn = unborn  # created while traced, and not yet at its first stop


class TaskControl:
    """Attaching to, stopping for and detaching from the tasks of traced processes."""

    batched_wakeups = False  # see Tracer.set_batched_wakeups

    # ---- attaching --------------------------------------------------------------------------

    def _options(self) -> int:
        return pt.FOLLOW | (pt.O_EXITKILL if self.exitkill else 0)

    def _bpf_mode(self) -> int:
        if self.mode is Mode.GATE:
            return MODE_GATE
        if self.mode is Mode.HOLD_OUTPUT:
            return MODE_HOLD_OUTPUT
        return MODE_TRACE if self.background or self.batched_wakeups else MODE_OBSERVE

    def _attach(self, pid: int) -> None:
        self.pid = pid
        conns: dict[int, int] = {}  # socket inode -> conn: one id for a socket in every process
        self._attach_process(pid, conns)
        # The processes it forked before now (a pre-forking server's workers) hold its sockets
        # too. Its later forks are followed as they happen: a child the tracer already traces
        # that way is adopted when its first stop is read.
        me = threading.get_native_id()  # TracerPid names the tracing thread
        todo = procfs.children(pid)
        while todo:
            child = todo.pop()
            if child not in self._tgids and procfs.tracer_pid(child) != me:
                self._attach_process(child, conns)
                todo += procfs.children(child)

    def _attach_process(self, pid: int, conns: dict[int, int]) -> None:
        self._supervise(pid)
        self._prefill_sockets(pid, conns)
        self._seize_threads(pid)

    def _launch(self, argv: list[str]) -> None:
        """Fork, stop the child before it execs, seize it, then let it exec under the tracer."""
        if shutil.which(argv[0]) is None:
            raise AttachError(f"cannot start {argv[0]}: command not found")
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe work until exec
            try:
                os.kill(os.getpid(), signal.SIGSTOP)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise AttachError(f"{argv[0]} exited before it could be traced")
        self.pid = pid
        self._supervise(pid)
        pt.seize(pid, self._options())
        self._adopt(pid, pid)
        os.kill(pid, signal.SIGCONT)

    def _supervise(self, tgid: int) -> None:
        """Give the probes a new process, in the mode of the others (set_mode may be changing
        it on another thread right now)."""
        with self._mode_lock:
            assert self.probes is not None
            self.probes.supervise_tgid(tgid, self._bpf_mode())
            self._tgids.add(tgid)

    def _prefill_sockets(self, tgid: int, conns: dict[int, int]) -> None:
        """Track the TCP sockets ``tgid`` holds; ``conns`` (inode -> conn) names the connections
        already found in other processes, and takes the new ones."""
        assert self.probes is not None
        for fd, sock in procfs.tcp_fds(tgid).items():
            if sock.state == procfs.TCP_LISTEN:
                self.probes.add_socket(tgid, fd, SOCK_LISTEN)
            elif sock.state == procfs.TCP_ESTABLISHED:
                conn = conns[sock.inode] = self.probes.add_socket(tgid, fd, SOCK_CONN,
                                                                  conns.get(sock.inode))
                self._peers[conn] = sock.remote
                self._descriptors.opened(tgid, fd, conn)

    def _after_exec(self, tgid: int) -> None:
        """exec closed the descriptors marked close-on-exec, with no close call for the probes
        to see: drop them, so that a file the new program opens under one of their numbers is
        not taken for the socket."""
        assert self.probes is not None
        still_open = procfs.tcp_fds(tgid)
        gone = [(fd, conn) for fd, (conn, _kind) in self.probes.sockets_of(tgid).items()
                if fd not in still_open]
        for fd, _conn in gone:
            self.probes.drop_socket(tgid, fd)
        self._descriptors_gone(tgid, gone)
        self._prefill_sockets(tgid, {})

    def _seize_threads(self, pid: int) -> None:
        quiet_passes = 0
        while quiet_passes < 2:
            found_new = False
            for tid in procfs.threads(pid):
                if tid in self._threads:
                    continue
                try:
                    pt.seize(tid, self._options())
                except pt.ThreadGone:
                    continue
                except Exception as exc:
                    raise AttachError(f"cannot seize thread {tid} of pid {pid}: {exc}") from None
                self._adopt(tid, pid)
                found_new = True
            quiet_passes = 0 if found_new else quiet_passes + 1
        if not self._threads:
            raise AttachError(f"pid {pid} exited while attaching")

    def _adopt(self, tid: int, tgid: int, unborn: bool = False) -> None:
        """Record a seized thread; only now may the probe gate it."""
        assert self.probes is not None
        self._threads[tid] = Task(tid, tgid, unborn)
        self.probes.trace_tid(tid)
        self.stats.threads = len(self._threads)

    # ---- ptrace stops -----------------------------------------------------------------------

    def _reap_all(self) -> None:
        while True:
            tid, status = pt.wait_any(nohang=True)
            if not tid:
                return
            self._on_wait(tid, status)

    def _on_wait(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._on_thread_exit(tid, status)
            return
        if not os.WIFSTOPPED(status):
            return
        thread = self._threads.get(tid)
        if thread is None:
            thread = self._adopt_unknown(tid)
            if thread is None:
                return
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if thread.unborn:
            thread.unborn = False
            if event == pt.EVENT_STOP and sig == signal.SIGTRAP:  # its first stop, before it runs
                self._on_first_stop(thread)
                return
        if event == 0:
            self._on_signal_stop(thread, sig)
        elif event == pt.EVENT_STOP:
            if sig in STOP_SIGNALS:
                self._listen(tid)
            else:
                self._cont(tid, 0)
        elif event in (pt.EVENT_CLONE, pt.EVENT_FORK, pt.EVENT_VFORK):
            self._on_new_task(thread, event)
            self._cont(tid, 0)
        elif event == pt.EVENT_EXEC:
            self._breakpoints_dropped_by_exec(thread.tgid)
            self._after_exec(thread.tgid)
            self._on_exec_done(thread)
        else:
            self._cont(tid, 0)

    def _on_signal_stop(self, thread: Task, sig: int) -> None:
        """A probe's SIGSTOP (sent by the kernel) or a trap at an output breakpoint is the
        tracer's; any other signal goes on to the thread."""
        if sig == signal.SIGSTOP or (sig == signal.SIGTRAP and thread.tid in self._loaded):
            try:
                _, code = pt.siginfo_code(thread.tid)
            except pt.ThreadGone:
                self._forget_thread(thread.tid)
                return
            if sig == signal.SIGSTOP and code == pt.SI_KERNEL:
                self._on_gate_stop(thread)
                return
            if sig == signal.SIGTRAP and code == breakpoints.TRAP_HWBKPT:
                self._on_trap(thread)
                return
        self._cont(thread.tid, sig)

    def _listen(self, tid: int) -> None:
        try:
            pt.listen(tid)
        except pt.ThreadGone:
            self._forget_thread(tid)

    def _cont(self, tid: int, sig: int) -> None:
        try:
            pt.cont(tid, sig)
        except pt.ThreadGone:
            self._forget_thread(tid)

    def _on_new_task(self, parent: Task, event: int) -> None:
        new_tid = pt.event_msg(parent.tid)
        if new_tid in self._threads:
            return
        if event == pt.EVENT_CLONE:
            self._adopt(new_tid, parent.tgid, unborn=True)
        else:
            self._adopt_process(new_tid, parent.tgid)

    def _adopt_process(self, pid: int, parent_tgid: int) -> None:
        """A forked child holds its parent's sockets: supervise it like its parent, before it
        is allowed to run."""
        self._supervise(pid)
        assert self.probes is not None
        for fd, conn in self.probes.copy_sockets(parent_tgid, pid):
            self._descriptors.opened(pid, fd, conn)
        self._inherit_output_entries(pid, parent_tgid)
        self._adopt(pid, pid, unborn=True)

    def _adopt_unknown(self, tid: int) -> Task | None:
        """A stop from a task whose creation event has not been seen yet."""
        try:
            tgid = int(procfs.status_field(tid, "Tgid") or 0)
            parent = int(procfs.status_field(tgid, "PPid") or 0)
        except procfs.GONE:
            return None
        if tgid in self._tgids:
            self._adopt(tid, tgid, unborn=True)
        elif tgid == tid and parent in self._tgids:
            self._adopt_process(tid, parent)
        else:
            return None
        return self._threads[tid]

    def _on_thread_exit(self, tid: int, status: int) -> None:
        self._forget_thread(tid)
        if tid in self._tgids:  # a process's leader thread is reported last
            self._exit_status = os.waitstatus_to_exitcode(status)
            self._tgids.discard(tid)
            if self.probes is not None:
                self.probes.forget_tgid(tid)
            self._forget_process_outputs(tid)
            self._descriptors_gone(tid, None)

    def _forget_thread(self, tid: int) -> None:
        thread = self._threads.pop(tid, None)
        if thread is None:
            return
        if thread.pending is not None and not thread.pending.released and not thread.pending.holds_outputs:
            self.stats.held -= 1
        self._forget_breakpoints(tid)
        self._quiet(tid)
        if self.probes is not None:
            self.probes.untrace_tid(tid)
        self.stats.threads = len(self._threads)

    # ---- detaching --------------------------------------------------------------------------

    def _detach_all(self) -> None:
        """Stop gating, then detach thread by thread so that no SIGSTOP is left behind."""
        assert self.probes is not None
        for tgid in list(self._tgids):
            self.probes.unsupervise_tgid(tgid)
        self._pump_events()
        for thread in list(self._threads.values()):
            if thread.gate_stopped or thread.tid in self._trapped:
                self._detach_one(thread.tid, 0)
            else:
                try:
                    pt.interrupt(thread.tid)
                except pt.ThreadGone:
                    self._forget_thread(thread.tid)
        deadline = time.monotonic() + 5.0
        while self._threads and time.monotonic() < deadline:
            tid, status = pt.wait_any(nohang=True)
            if not tid:
                time.sleep(0.0005)
                continue
            self._on_detach_wait(tid, status)
        for tgid in list(self._tgids):
            self.probes.forget_tgid(tgid)
        self._tgids.clear()
        if self._threads:
            log.error("threads %s did not stop for detach", sorted(self._threads))

    def _kill_on_failure(self) -> None:
        """Fail closed: a detach would let every held input and output go, uncommitted, so the
        traced processes are killed, as PTRACE_O_EXITKILL would kill them with their tracer."""
        log.exception("tracer thread failed while holding pids %s: killing them, since they must "
                      "not run unheld", sorted(self._tgids))
        for tgid in self._tgids:
            try:
                os.kill(tgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _on_detach_wait(self, tid: int, status: int) -> None:
        if tid not in self._threads:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._forget_thread(tid)
            return
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == 0:
            if sig == signal.SIGSTOP and pt.siginfo_code(tid)[1] == pt.SI_KERNEL:
                self._detach_one(tid, 0)
            elif (sig == signal.SIGTRAP and tid in self._loaded
                  and pt.siginfo_code(tid)[1] == breakpoints.TRAP_HWBKPT):
                self._detach_one(tid, 0)
            else:
                self._detach_one(tid, sig)
            return
        if procfs.pending_signals(tid) & (1 << (signal.SIGSTOP - 1)):
            self._cont(tid, 0)  # a probe's SIGSTOP is still queued: let it surface, then drop it
            return
        self._detach_one(tid, 0)

    def _detach_one(self, tid: int, sig: int) -> None:
        self._clear_breakpoints(tid)
        try:
            pt.detach(tid, sig)
        except pt.ThreadGone:
            pass
        self._forget_thread(tid)


def check_attachable(pid: int) -> None:
    """Refuse, with one line for the operator, what cannot or must not be attached."""
    if os.geteuid() != 0:
        raise AttachError("must run as root (ptrace and BPF need CAP_SYS_PTRACE and CAP_BPF)")
    if pid <= 0 or not procfs.exists(pid):
        raise AttachError(f"no process with pid {pid}")
    if procfs.is_kernel_thread(pid):
        raise AttachError(f"pid {pid} ({procfs.comm(pid)}) is a kernel thread; nothing to trace")
    if pid == os.getpid():
        raise AttachError(f"pid {pid} is this supervisor itself")
    tracer = procfs.tracer_pid(pid)
    if tracer:
        raise AttachError(
            f"pid {pid} is already traced by pid {tracer} ({procfs.comm(tracer)}); detach it first"
        )
