"""Keeps the syscall tracepoints that the probes attach to in use for a whole test run.

When the last user of a tracepoint leaves it, the kernel waits for its grace periods before the
detach returns, one tracepoint after another under its event mutex. A supervisor killed at the
end of a test took up to 1.2 s to be reaped, about half of it there. A disabled perf event of the
test process on each of those tracepoints keeps them in use, so a detach pays only its own part.
Disabled, they count nothing. The price: while a syscall tracepoint is in use, every syscall on
the machine takes the kernel's slower path (about 85 ns more here), as it does whenever any
tracer or supervisor runs. Nothing under test behaves otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from tracer.probes import BPF_SOURCE

TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")
PERF_EVENT_OPEN = 298  # x86-64
PERF_TYPE_TRACEPOINT = 2
PERF_ATTR_SIZE_VER0 = 64
PERF_ATTR_DISABLED = 1  # the first bit of the attribute flags, at offset 40
PERF_FLAG_FD_CLOEXEC = 8


def probe_syscall_tracepoints(source: Path = BPF_SOURCE) -> list[str]:
    """``syscalls:<event>`` for each syscall tracepoint the probes' source attaches to."""
    text = source.read_text()
    exits = re.findall(r"^EXIT_PROBE\((\w+),", text, re.MULTILINE)
    others = re.findall(r"^TRACEPOINT_PROBE\(syscalls, (\w+)\)", text, re.MULTILINE)
    return [f"syscalls:sys_exit_{name}" for name in exits] + [f"syscalls:{name}" for name in others]


def _open_disabled(tracepoint: str, libc: ctypes.CDLL) -> int:
    category, event = tracepoint.split(":")
    event_id = int((TRACEFS_EVENTS / category / event / "id").read_text())
    attr = bytearray(PERF_ATTR_SIZE_VER0)
    struct.pack_into("IIQ", attr, 0, PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE_VER0, event_id)
    struct.pack_into("Q", attr, 40, PERF_ATTR_DISABLED)
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd = libc.syscall(PERF_EVENT_OPEN, buf, 0, -1, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open of {tracepoint}: {os.strerror(err)}")
    return fd


@contextlib.contextmanager
def tracepoints_held(tracepoints: list[str]) -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    fds: list[int] = []
    try:
        for tracepoint in tracepoints:
            fds.append(_open_disabled(tracepoint, libc))
        yield
    finally:
        for fd in fds:
            os.close(fd)
