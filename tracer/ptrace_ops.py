"""The ptrace requests the tracer uses, on top of python-ptrace's binding.

python-ptrace provides the raw call, siginfo and event-message helpers; PTRACE_SEIZE,
PTRACE_INTERRUPT and PTRACE_LISTEN (which it lacks) are issued through the same raw call.
Every function here must be called from the tracer thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Iterator

from ptrace.binding import func as pt
from ptrace.error import PtraceError

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

O_TRACESYSGOOD = 0x01
O_TRACEFORK = 0x02
O_TRACEVFORK = 0x04
O_TRACECLONE = 0x08
O_TRACEEXEC = 0x10
O_TRACEEXIT = 0x40
O_EXITKILL = 0x100000

EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_EXIT = 6
EVENT_STOP = 128

WALL = 0x40000000
SI_KERNEL = 0x80

FOLLOW = O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC | O_TRACEEXIT


class ThreadGone(Exception):
    """The thread exited (ESRCH): treat it as gone."""


@contextlib.contextmanager
def _esrch_means_gone(tid: int) -> Iterator[None]:
    try:
        yield
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise ThreadGone(tid) from None
        raise


def _call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    with _esrch_means_gone(tid):
        return pt.ptrace(request, tid, addr, data)


def seize(tid: int, options: int) -> None:
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid)


def listen(tid: int) -> None:
    _call(PTRACE_LISTEN, tid)


def cont(tid: int, sig: int = 0) -> None:
    _call(pt.PTRACE_CONT, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _call(pt.PTRACE_DETACH, tid, 0, sig)


def set_syscall_result(tid: int, value: int) -> None:
    """Rewrite what the stopped thread's last syscall returns to user space (x86_64: rax)."""
    with _esrch_means_gone(tid):
        regs = pt.ptrace_getregs(tid)
        regs.rax = value & 0xFFFFFFFFFFFFFFFF
        pt.ptrace_setregs(tid, regs)


_SYSCALL_INSN = b"\x0f\x05"  # x86_64 `syscall`
SYS_CLOSE = 3


class InjectFailed(Exception):
    """The thread did not run the injected syscall; ``status`` is a wait status that belongs to
    the tracer's loop (another stop came first), or None."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def run_syscall(tid: int, pid: int, nr: int, arg0: int, result_after: int) -> int:
    """Make a thread that is stopped right after a syscall run one more syscall (``nr(arg0)``),
    then put its registers back as they were, except that the first syscall now returns
    ``result_after``. Returns what the injected syscall returned.

    Nothing is written to the process's memory: the thread re-executes the ``syscall``
    instruction it has just left (two bytes before its instruction pointer), single-stepped.
    Raises InjectFailed if that instruction is not there or another stop comes first; the
    registers are then restored before it returns."""
    with _esrch_means_gone(tid):
        regs = pt.ptrace_getregs(tid)
    saved = type(regs).from_buffer_copy(regs)
    saved.rax = result_after & 0xFFFFFFFFFFFFFFFF
    try:
        insn = read_memory(pid, regs.rip - 2, 2)
    except OSError as exc:
        raise InjectFailed(f"cannot read the instruction before {regs.rip:#x}: {exc}") from None
    if insn != _SYSCALL_INSN:
        raise InjectFailed(f"no syscall instruction before {regs.rip:#x} (a signal frame?)")
    regs.rax = nr
    regs.orig_rax = 0xFFFFFFFFFFFFFFFF  # not in a syscall: no restart logic on resuming
    regs.rdi = arg0 & 0xFFFFFFFFFFFFFFFF
    regs.rip -= 2
    with _esrch_means_gone(tid):
        pt.ptrace_setregs(tid, regs)
        _call(pt.PTRACE_SINGLESTEP, tid)
        _, status = wait_tid(tid, nohang=False)
        if not os.WIFSTOPPED(status):
            raise InjectFailed("the thread ended", status)
        stepped = os.WSTOPSIG(status) == signal.SIGTRAP and status >> 16 == 0
        got = pt.ptrace_getregs(tid).rax if stepped else 0
        pt.ptrace_setregs(tid, saved)
    if not stepped:
        raise InjectFailed(f"another stop came first (wait status {status:#x})", status)
    return got - (1 << 64) if got >= 1 << 63 else got


def event_msg(tid: int) -> int:
    msg = ctypes.c_ulong()
    _call(pt.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


def siginfo_code(tid: int) -> tuple[int, int]:
    """(si_signo, si_code) of the signal a thread is stopped for."""
    with _esrch_means_gone(tid):
        info = pt.ptrace_getsiginfo(tid)
    return info.si_signo, info.si_code


def wait_any(nohang: bool) -> tuple[int, int]:
    """(tid, status) of any tracee or child with news, (0, 0) when none (with nohang)."""
    try:
        return os.waitpid(-1, WALL | (os.WNOHANG if nohang else 0))
    except ChildProcessError:
        return 0, 0


def wait_tid(tid: int, nohang: bool) -> tuple[int, int]:
    try:
        return os.waitpid(tid, WALL | (os.WNOHANG if nohang else 0))
    except ChildProcessError:
        return 0, 0


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
]
_process_vm_readv.restype = ctypes.c_ssize_t


def read_memory(pid: int, address: int, length: int) -> bytes:
    """Read ``length`` bytes of another process's memory (process_vm_readv)."""
    if length <= 0:
        return b""
    buf = ctypes.create_string_buffer(length)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _IoVec(address, length)
    got = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv({pid}, {address:#x}, {length}): {os.strerror(err)}")
    return buf.raw[:got]


def read_iovecs(pid: int, iov_address: int, iov_count: int, total: int) -> bytes:
    """Gather ``total`` bytes from a remote iovec array."""
    count = min(iov_count, 1024)
    raw = read_memory(pid, iov_address, count * ctypes.sizeof(_IoVec))
    vecs = (_IoVec * count).from_buffer_copy(raw)
    out = bytearray()
    for vec in vecs:
        if len(out) >= total:
            break
        take = min(vec.len, total - len(out))
        out += read_memory(pid, vec.base, take)
    return bytes(out)
