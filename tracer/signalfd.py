"""A signalfd for SIGCHLD, so that the tracer thread can sleep in epoll until a tracee stops.

SIGCHLD must be blocked in every thread for the fd to see it reliably; the tracer blocks it in
its own thread and `block_sigchld()` is called by programs at start, before other threads
exist. Where another thread still takes the signal, the tracer's short epoll timeout catches
the stop instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

from . import procfs

log = logging.getLogger("tracer")

SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000
_SIGINFO_SIZE = 128

_libc = ctypes.CDLL(None, use_errno=True)
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int


def block_sigchld() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})


def threads_taking_sigchld() -> list[str]:
    """Threads of this process that do not block SIGCHLD ("name (tid)"): any of them may take a
    tracee's stop notification from the signalfd."""
    bit = 1 << (signal.SIGCHLD - 1)
    found = []
    for tid in procfs.threads(os.getpid()):
        try:
            blocked = procfs.status_field(tid, "SigBlk")
        except procfs.GONE:
            continue
        if blocked is not None and not int(blocked, 16) & bit:
            found.append(f"{procfs.comm(tid)} ({tid})")
    return found


class SigchldFd:
    def __init__(self) -> None:
        block_sigchld()
        taking = threads_taking_sigchld()
        if taking:
            log.warning("threads of this process that do not block SIGCHLD: %s; a tracee's stop may "
                        "then reach the tracer only on its next poll, tens of ms later: call "
                        "tracer.signalfd.block_sigchld() before starting threads", ", ".join(taking))
        mask = (ctypes.c_ulong * 16)()
        mask[0] = 1 << (signal.SIGCHLD - 1)
        self.fd = _libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"signalfd: {os.strerror(err)}")

    def drain(self) -> None:
        try:
            while os.read(self.fd, _SIGINFO_SIZE * 16):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
