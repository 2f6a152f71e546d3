"""Socket events as the tracer hands them to its caller."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum


class Call(IntEnum):
    """Syscall ids shared with tracer/bpf/sockets.c (enum call)."""

    ACCEPT = 1
    ACCEPT4 = 2
    READ = 3
    READV = 4
    RECVFROM = 5
    RECVMSG = 6
    WRITE = 7
    WRITEV = 8
    SENDTO = 9
    SENDMSG = 10
    SENDFILE = 11
    CLOSE = 12
    SHUTDOWN = 13
    DUP = 14
    DUP2 = 15
    DUP3 = 16
    LISTEN = 17
    CLOSE_RANGE = 18  # one event for each tracked socket in the range
    SLEEP = 19  # not a syscall: a thread went to sleep after taking input (tracer/serial.py)

    @property
    def syscall(self) -> str:
        return "sendfile" if self is Call.SENDFILE else self.name.lower()


ACCEPTS = frozenset({Call.ACCEPT, Call.ACCEPT4})
READS = frozenset({Call.READ, Call.READV, Call.RECVFROM, Call.RECVMSG})
DUPS = frozenset({Call.DUP, Call.DUP2, Call.DUP3})
CLOSES = frozenset({Call.CLOSE, Call.CLOSE_RANGE})
VECTORED = frozenset({Call.READV, Call.WRITEV})
MSGHDR = frozenset({Call.RECVMSG, Call.SENDMSG})


class Direction(IntEnum):
    IN = 0
    OUT = 1
    CTL = 2

    @property
    def label(self) -> str:
        return ("in", "out", "ctl")[self]


class Hold(IntEnum):
    """How the probe held an event (its ``gated`` byte in bpf/sockets.c)."""

    NONE = 0
    THREAD = 1  # an input whose thread is stopped until it is released
    OUTPUTS = 2  # an input whose thread runs on; its outputs wait until it is released
    OUTPUTS_STOP = 3  # as OUTPUTS, the thread stopped only to be armed, or its input read whole
    MISSED = 4  # an output an armed thread wrote past its breakpoints
    CROSSED = 5  # an output a disarmed thread wrote after another thread's later input


@dataclass(eq=False, slots=True)
class SocketEvent:
    """One socket syscall of a supervised process, as it returned in the kernel.

    ``input`` events (accept, read with data, EOF or reset) are the ones that replication must
    agree on; in gate mode their thread is held until ``Tracer.release`` is called, and in
    hold-output mode their thread's outputs are (``gated`` says which events wait for it).
    ``data`` holds the payload: whole for held inputs, up to the snap length otherwise.
    A close with ``tid`` 0 was made by no thread: its process exited, or exec closed the
    descriptor, without a close call.
    """

    seq: int
    t: float
    pid: int
    tid: int
    call: Call
    fd: int
    ret: int
    conn: int
    dir: Direction
    input: bool
    gated: bool
    data: bytes = b""
    peer: str | None = None
    escaped: bool = False
    released: bool = field(default=False, repr=False)
    refused: int = field(default=0, repr=False)  # the errno a refused syscall fails with
    buf: int = field(default=0, repr=False)
    count: int = field(default=0, repr=False)
    # a close: whether it ended the connection, or another descriptor (a dup, or a forked
    # process's copy) still holds it
    last: bool = field(default=True, repr=False)
    hold: Hold = field(default=Hold.NONE, repr=False)

    @property
    def stopped(self) -> bool:
        """The probe stopped the thread for this event."""
        return self.hold is Hold.THREAD or self.hold is Hold.OUTPUTS_STOP

    @property
    def holds_outputs(self) -> bool:
        return self.hold is Hold.OUTPUTS or self.hold is Hold.OUTPUTS_STOP

    @property
    def is_eof(self) -> bool:
        """The peer closed (read returned 0) or reset the connection."""
        return self.call in READS and self.ret <= 0


def format_sockaddr(raw: bytes) -> str | None:
    """``ip:port`` from a struct sockaddr_in / sockaddr_in6 as accept() wrote it."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return f"{socket.inet_ntoa(raw[4:8])}:{port}"
    if family == socket.AF_INET6 and len(raw) >= 24:
        addr = ipaddress.IPv6Address(raw[8:24])
        if addr.ipv4_mapped:
            return f"{addr.ipv4_mapped}:{port}"
        return f"[{addr}]:{port}"
    return None
