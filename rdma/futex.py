"""Futex doorbells on a 32-bit word in (possibly shared) memory, through ctypes.

The waker uses FUTEX_WAKE_OP with ``uaddr2 == uaddr`` so the kernel increments the word
atomically *and* wakes the sleepers in one call: a sleeper that read the word before it checked
its rings either sees a changed word (EAGAIN) or is queued before the wake, so no wakeup is lost
even with several producers in several processes, without any user-space atomics.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)
_FUTEX_WAIT = 0
_FUTEX_WAKE_OP = 5
_FUTEX_OP_ADD = 1
_FUTEX_OP_CMP_EQ = 0
# op(uaddr2) = += 1; the comparison result only gates waking nr_wake2 (0) extra sleepers.
_WAKE_OP_ADD1 = (_FUTEX_OP_ADD << 28) | (_FUTEX_OP_CMP_EQ << 24) | (1 << 12) | 0
_INT_MAX = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Doorbell:
    """A futex word at ``offset`` of a writable buffer (an mmap). ``seq`` reads it."""

    def __init__(self, buffer, offset: int = 0) -> None:
        self._word = ctypes.c_uint32.from_buffer(buffer, offset)
        self._addr = ctypes.c_void_p(ctypes.addressof(self._word))

    @property
    def seq(self) -> int:
        return self._word.value

    def ring(self) -> None:
        """Atomically bump the word and wake every sleeper (one syscall)."""
        _syscall(_SYS_FUTEX, self._addr, _FUTEX_WAKE_OP, _INT_MAX, None, self._addr, _WAKE_OP_ADD1)

    def sleep(self, seq: int, timeout: float) -> None:
        """Sleep while the word still equals ``seq``, at most ``timeout`` seconds."""
        if timeout <= 0:
            return
        sec = int(timeout)
        ts = _Timespec(sec, int((timeout - sec) * 1e9))
        r = _syscall(_SYS_FUTEX, self._addr, _FUTEX_WAIT, seq & 0xFFFFFFFF, ctypes.byref(ts), None, 0)
        if r < 0:
            e = ctypes.get_errno()
            if e not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(e, os.strerror(e))

    def release(self) -> None:
        """Drop the buffer export so the underlying mmap can be closed."""
        self._word = None  # type: ignore[assignment]
        self._addr = None  # type: ignore[assignment]
