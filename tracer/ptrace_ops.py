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
from collections.abc import Iterator

from ptrace.binding import func as pt
from ptrace.error import PtraceError

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

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
def esrch_means_gone(tid: int) -> Iterator[None]:
    """A ptrace request that fails with ESRCH raises ThreadGone: the thread has exited."""
    try:
        yield
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise ThreadGone(tid) from None
        raise


def request(req: int, tid: int, addr: int = 0, data: int = 0) -> int:
    with esrch_means_gone(tid):
        return pt.ptrace(req, tid, addr, data)


def seize(tid: int, options: int) -> None:
    request(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    request(PTRACE_INTERRUPT, tid)


def listen(tid: int) -> None:
    request(PTRACE_LISTEN, tid)


def cont(tid: int, sig: int = 0) -> None:
    request(pt.PTRACE_CONT, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    request(pt.PTRACE_DETACH, tid, 0, sig)


def event_msg(tid: int) -> int:
    msg = ctypes.c_ulong()
    request(pt.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


def get_sigmask(tid: int) -> int:
    """The signals a stopped thread blocks, as a bit mask (bit n-1 for signal n)."""
    mask = ctypes.c_uint64()
    request(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, blocked: int) -> None:
    """Set a stopped thread's blocked signals (SIGKILL and SIGSTOP cannot be blocked)."""
    mask = ctypes.c_uint64(blocked)
    request(PTRACE_SETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))


def siginfo_code(tid: int) -> tuple[int, int]:
    """(si_signo, si_code) of the signal a thread is stopped for."""
    with esrch_means_gone(tid):
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


_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.argtypes = _process_vm_readv.argtypes
_process_vm_writev.restype = ctypes.c_ssize_t


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` into another process's memory (process_vm_writev)."""
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _IoVec(address, len(data))
    wrote = _process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if wrote < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_writev({pid}, {address:#x}, {len(data)}): {os.strerror(err)}")
    if wrote != len(data):  # the range ends in an unmapped page: the kernel stops there, no errno
        raise OSError(errno.EFAULT, f"process_vm_writev({pid}, {address:#x}, {len(data)}): "
                                    f"wrote only {wrote} bytes")


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


def read_msghdr(pid: int, msghdr_address: int, total: int) -> bytes:
    """Gather ``total`` bytes from the buffers of a remote struct msghdr (msg_iov, msg_iovlen)."""
    header = read_memory(pid, msghdr_address + 16, 16)
    iov, iovlen = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
    return read_iovecs(pid, iov, iovlen, total)
