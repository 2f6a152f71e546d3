"""The eBPF side of the tracer: loads tracer/bpf/sockets.c with bcc and manages its maps."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from pathlib import Path

from . import ringbuf

log = logging.getLogger("tracer")
BPF_SOURCE = Path(__file__).with_name("bpf") / "sockets.c"
MODE_OBSERVE = 1
MODE_GATE = 2
MODE_TRACE = 3  # observe; the reader is woken per batch, not per event
SOCK_LISTEN = 1
SOCK_CONN = 2
BPF_NOEXIST = 1
PREFILL_CONN_BASE = 1 << 40
MAX_SNAPLEN = 16384  # an event is built in a per-CPU map value (at most 32 KiB)
RINGBUF_PAGES = 8192  # 32 MiB; records take their real size, not the snap length


class ProbeError(Exception):
    """The eBPF programs could not be compiled or attached."""


PIDFD_THREAD = os.O_EXCL  # a pidfd for one thread, not its process (Linux 6.9)


class SavedArgs(ctypes.Structure):
    """struct saved_args of tracer/bpf/sockets.c (a task storage value: keyed by pidfd)."""

    _fields_ = [("call", ctypes.c_uint32), ("fd", ctypes.c_int32), ("buf", ctypes.c_uint64),
                ("count", ctypes.c_uint64), ("addrlen", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("conn", ctypes.c_uint64)]


# struct event of tracer/bpf/sockets.c up to its data[] (the C side asserts the same offset)
EVENT_HEADER = struct.Struct("=QQQqQQIIIiIBBBB28s")


class Probes:
    """Compiled and attached socket probes with their maps.

    bcc attaches every ``TRACEPOINT_PROBE`` when the program loads; closing detaches them.
    """

    def __init__(self, snaplen: int = 4096) -> None:
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snap length must be 1..{MAX_SNAPLEN}, not {snaplen}")
        try:
            from bcc import BPF
        except ImportError as exc:
            raise ProbeError(f"bcc is not importable ({exc}); run 'supervise doctor'") from None
        _ensure_tracefs()
        cflags = [f"-DSNAPLEN={snaplen}", f"-DRINGBUF_PAGES={RINGBUF_PAGES}", "-w"]
        try:
            self.bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as exc:
            raise ProbeError(
                f"could not compile or load {BPF_SOURCE.name}: {exc}; run 'supervise doctor'"
            ) from None
        self.snaplen = snaplen
        self.tgids = self.bpf[b"tgids"]
        self.tids = self.bpf[b"tids"]
        self.socks = self.bpf[b"socks"]
        self.counters = self.bpf[b"counters"]
        from bcc import libbcc

        self._args_fd = libbcc.lib.bpf_table_fd(self.bpf.module, b"args")  # bcc wraps no task storage
        self._prefill_next = PREFILL_CONN_BASE + 1
        self._ring: ringbuf.RingReader | None = None
        self._records: list[bytes] = []

    def open_events(self) -> int:
        """Start reading the ring buffer; returns an fd that polls readable when records wait."""
        if ringbuf.supported():
            self._ring = ringbuf.RingReader(self.bpf[b"events"].map_fd, RINGBUF_PAGES * 4096)
            return self._ring.fd
        self.bpf[b"events"].open_ring_buffer(self._copy_record)
        libbpf = ctypes.CDLL("libbpf.so.1")
        libbpf.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
        libbpf.ring_buffer__epoll_fd.restype = ctypes.c_int
        return libbpf.ring_buffer__epoll_fd(self.bpf._ringbuf_manager)

    def _copy_record(self, _ctx: object, data: int, size: int) -> int:
        self._records.append(ctypes.string_at(data, size))
        return 0

    def read_events(self) -> list[bytes]:
        """The records waiting in the ring buffer, oldest first (each a struct event cut at its
        data: EVENT_HEADER, then the payload)."""
        if self._ring is not None:
            return self._ring.read()
        self.bpf.ring_buffer_consume()
        records, self._records = self._records, []
        return records

    def supervise_tgid(self, tgid: int, mode: int) -> None:
        self.tgids[ctypes.c_uint32(tgid)] = ctypes.c_uint32(mode)

    def forget_tgid(self, tgid: int) -> None:
        self.tgids.pop(ctypes.c_uint32(tgid), None)
        for key in [k for k in self.socks.keys() if k.tgid == tgid]:
            self.socks.pop(key, None)

    def trace_tid(self, tid: int) -> None:
        self.tids[ctypes.c_uint32(tid)] = ctypes.c_uint8(1)

    def untrace_tid(self, tid: int) -> None:
        self.tids.pop(ctypes.c_uint32(tid), None)

    def add_socket(self, tgid: int, fd: int, kind: int) -> int:
        """Track an fd found at attach time unless the probes already track it; returns its
        conn id (0 for listeners)."""
        from bcc import libbcc

        key = self.socks.Key(tgid, fd)
        conn = 0 if kind == SOCK_LISTEN else self._prefill_next
        leaf = self.socks.Leaf(conn, kind, 0)
        rc = libbcc.lib.bpf_update_elem(
            self.socks.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST
        )
        if rc == 0:
            if kind == SOCK_CONN:
                self._prefill_next += 1
            return conn
        existing = self.socks.get(key)
        return existing.conn if existing is not None else 0

    def copy_sockets(self, from_tgid: int, to_tgid: int) -> None:
        """A forked child holds its parent's sockets under the same conn ids."""
        for fd, (conn, kind) in self.sockets_of(from_tgid).items():
            self.socks[self.socks.Key(to_tgid, fd)] = self.socks.Leaf(conn, kind, 0)

    def seed_args(self, tid: int, call: int, fd: int, buf: int, count: int, flags: int) -> None:
        """Arguments of a syscall a thread was already blocked in when the probes loaded, so
        that its return is captured (and gated) like any other."""
        from bcc import libbcc

        pidfd = _thread_pidfd(tid)
        if pidfd is None:
            return
        try:
            value = SavedArgs(call, fd, buf, count, 0, flags, 0, 0)
            key = ctypes.c_int(pidfd)
            rc = libbcc.lib.bpf_update_elem(self._args_fd, ctypes.byref(key), ctypes.byref(value), 0)
            if rc:
                raise OSError(f"could not save the arguments of thread {tid}'s blocked call ({rc})")
        finally:
            os.close(pidfd)

    def drop_socket(self, tgid: int, fd: int) -> None:
        self.socks.pop(self.socks.Key(tgid, fd), None)

    def sockets_of(self, tgid: int) -> dict[int, tuple[int, int]]:
        """fd -> (conn, kind) for a tgid."""
        return {k.fd: (v.conn, v.kind) for k, v in self.socks.items() if k.tgid == tgid}

    def lost_events(self) -> int:
        return int(self.counters[ctypes.c_int(2)].value)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for table in (self.tgids, self.tids):
            table.clear()
        self.bpf.cleanup()


def _thread_pidfd(tid: int) -> int | None:
    """A pidfd for one thread; None if it is gone, or if this kernel (before 6.9) has pidfds
    only for a process's main thread and this is another."""
    for flags in (PIDFD_THREAD, 0):
        try:
            return os.pidfd_open(tid, flags)
        except ProcessLookupError:
            return None
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    log.warning("thread %d was blocked in a socket read when the tracer attached; this kernel has "
                "no thread pidfds (Linux 6.9), so that one read is neither captured nor held", tid)
    return None


def _ensure_tracefs() -> None:
    """bcc needs the syscall tracepoints' formats; `ip netns exec` mounts a /sys without them."""
    if os.path.isdir("/sys/kernel/tracing/events/syscalls") or os.geteuid() != 0:
        return
    import subprocess

    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True)
