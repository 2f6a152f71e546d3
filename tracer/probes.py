"""The eBPF side of the tracer: loads tracer/bpf/sockets.c with bcc and manages its maps."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import ringbuf

BPF_SOURCE = Path(__file__).with_name("bpf") / "sockets.c"
MODE_OBSERVE = 1
MODE_GATE = 2
MODE_TRACE = 3  # observe; the reader is woken per batch, not per event
MODE_HOLD_OUTPUT = 4  # inputs run on; outputs wait at breakpoints (output_hold.py)
ARMED = 1 << 63
SOCK_LISTEN = 1
SOCK_CONN = 2
BPF_NOEXIST = 1
BPF_EXIST = 2
PREFILL_CONN_BASE = 1 << 40
MAX_SNAPLEN = 16384  # an event is built in a per-CPU map value (at most 32 KiB)
RINGBUF_PAGES = 8192  # 32 MiB; records take their real size, not the snap length
TGID_SLOTS = 65536  # supervised tgids' modes (tgid modulo this; the tgids hash on a clash)


class ProbeError(Exception):
    """The eBPF programs could not be compiled or attached."""


# struct event of bpf/sockets.c up to its payload: ts_ns, seq, conn, ret, buf, count, tgid, tid,
# call, fd, data_len, dir, gated, input, peer_len, peer. The payload (data_len bytes) follows;
# the C side asserts its offset.
EVENT_HEADER = struct.Struct("=QQQqQQIIIiIBBBB28s")


class Probes:
    """Compiled and attached socket probes with their maps.

    bcc attaches every ``TRACEPOINT_PROBE`` when the program loads; closing detaches them.
    """

    def __init__(self, snaplen: int = 4096, serialize: bool = False) -> None:
        """``serialize``: also report when a thread that took input goes to sleep (Call.SLEEP),
        from a probe on every context switch of the machine (tracer/serial.py)."""
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snap length must be 1..{MAX_SNAPLEN}, not {snaplen}")
        try:
            from bcc import BPF
        except ImportError as exc:
            raise ProbeError(f"bcc is not importable ({exc}); run 'supervise doctor'") from None
        _ensure_tracefs()
        # -g0: no debug info, so no BTF of the program's own types, which nothing here reads
        # (a verifier's refusal then names no source lines); a fifth of the compile time
        cflags = [f"-DSNAPLEN={snaplen}", f"-DRINGBUF_PAGES={RINGBUF_PAGES}",
                  f"-DTGID_SLOTS={TGID_SLOTS}", "-w", "-g0"] + (["-DSERIALIZE"] if serialize else [])
        try:
            self.bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as exc:
            raise ProbeError(
                f"could not compile or load {BPF_SOURCE.name}: {exc}; run 'supervise doctor'"
            ) from None
        self.snaplen = snaplen
        self.serialize = serialize
        self.tgid_slot_count = TGID_SLOTS  # as compiled
        self.tgid_slots = self.bpf[b"tgid_slots"]
        self.tgids = self.bpf[b"tgids"]
        self.tids = self.bpf[b"tids"]
        self.socks = self.bpf[b"socks"]
        self.counters = self.bpf[b"counters"]
        self.armed = self.bpf[b"armed"]
        self.top_fd = self.bpf[b"top_fd"]
        self.busy = self.bpf[b"busy"] if serialize else None
        self.tallies = self.bpf[b"tallies"] if serialize else None
        self._prefill_next = PREFILL_CONN_BASE + 1
        self._slots_held: set[int] = set()
        self._reader: ringbuf.RingReader | None = None
        self._events_fd: int | None = None
        self._callback: Callable[[tuple, bytes], None] = _drop_record

    def open_events(self, callback: Callable[[tuple, bytes], None], mapped: bool = False) -> int:
        """Route ring-buffer records to ``callback(header, payload)``: the fields of EVENT_HEADER
        and the payload bytes. Returns an fd that polls readable when records are waiting.
        ``mapped``: read the ring from its memory mapping (tracer/ringbuf.py) where it can be.

        A record is copied out whole and unpacked at once: reading a ctypes structure field by
        field cost more than everything else done with an event. Opened again (probes used by
        one tracer after another), it routes them to the new ``callback``."""
        self._callback = callback
        if self._events_fd is not None:
            return self._events_fd
        unpack, start = EVENT_HEADER.unpack_from, EVENT_HEADER.size
        ring = self.bpf[b"events"]
        if mapped and ringbuf.supported():
            def on_view(record: memoryview) -> None:
                header = unpack(record)
                self._callback(header, record[start:start + header[10]].tobytes())

            self._reader = ringbuf.RingReader(ring.map_fd, RINGBUF_PAGES * mmap.PAGESIZE)
            self._on_view = on_view
            self._events_fd = self._reader.fd
            return self._events_fd

        string_at = ctypes.string_at

        def on_record(_ctx: object, data: int, size: int) -> int:
            record = string_at(data, size)
            header = unpack(record)
            self._callback(header, record[start:start + header[10]])
            return 0

        ring.open_ring_buffer(on_record)
        libbpf = ctypes.CDLL("libbpf.so.1")
        libbpf.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
        libbpf.ring_buffer__epoll_fd.restype = ctypes.c_int
        self._events_fd = libbpf.ring_buffer__epoll_fd(self.bpf._ringbuf_manager)
        return self._events_fd

    def consume(self) -> None:
        if self._reader is not None:
            self._reader.consume(self._on_view)
        else:
            self.bpf.ring_buffer_consume()

    def backlog(self) -> float | None:
        """The fraction of the ring buffer unread; None with libbpf's reader, which cannot say."""
        return self._reader.backlog() if self._reader is not None else None

    def supervise_tgid(self, tgid: int, mode: int) -> None:
        """Capture the tgid's syscalls in ``mode`` (MODE_*), or change its mode."""
        idx = ctypes.c_uint32(tgid % self.tgid_slot_count)
        holder = self.tgid_slots[idx].tgid
        if holder in (0, tgid):
            self.tgid_slots[idx] = self.tgid_slots.Leaf(tgid, mode)
            self._slots_held.add(idx.value)
        else:
            self.tgids[ctypes.c_uint32(tgid)] = ctypes.c_uint32(mode)

    def unsupervise_tgid(self, tgid: int) -> None:
        """Stop capturing the tgid's syscalls. A tgid that waited in the hash for this slot
        moves into it before it leaves the hash, so that its lookups never miss."""
        discard(self.tgids, ctypes.c_uint32(tgid))
        idx = ctypes.c_uint32(tgid % self.tgid_slot_count)
        if self.tgid_slots[idx].tgid != tgid:
            return
        waiting = [(k.value, v.value) for k, v in self.tgids.items()
                   if k.value % self.tgid_slot_count == idx.value]
        if waiting:
            self.tgid_slots[idx] = self.tgid_slots.Leaf(*waiting[0])
            discard(self.tgids, ctypes.c_uint32(waiting[0][0]))
        else:
            self.tgid_slots[idx] = self.tgid_slots.Leaf(0, 0)
            self._slots_held.discard(idx.value)

    def forget_tgid(self, tgid: int) -> None:
        self.unsupervise_tgid(tgid)
        discard(self.bpf[b"last_input"], ctypes.c_uint32(tgid))
        discard(self.top_fd, ctypes.c_uint32(tgid))
        if self.tallies is not None:
            discard(self.tallies, ctypes.c_uint32(tgid))
        for key, _ in self._socket_entries():
            if key.tgid == tgid:
                discard(self.socks, key)

    def trace_tid(self, tid: int) -> None:
        self.tids[ctypes.c_uint32(tid)] = ctypes.c_uint8(1)

    def untrace_tid(self, tid: int) -> None:
        key = ctypes.c_uint32(tid)
        discard(self.tids, key)
        discard(self.armed, key)
        if self.busy is not None:
            discard(self.busy, key)

    def input_tally(self, tgid: int) -> tuple[int, int] | None:
        """Serializing: bytes the process has read from tracked connections, and the thread that
        read the last of them; None before its first."""
        assert self.tallies is not None
        tally = self.tallies.get(ctypes.c_uint32(tgid))
        return None if tally is None else (tally.bytes, tally.tid)

    def thread_busy(self, tid: int) -> bool:
        """Serializing: whether the thread took input and has not gone to sleep for more since."""
        assert self.busy is not None
        return self.busy.get(ctypes.c_uint32(tid)) is not None

    def set_armed(self, tid: int, armed: bool, committed_seq: int = 0) -> None:
        """Record whether ``tid``'s output breakpoints are on; when off, the seq of the last
        input known committed as they went off (a later input of another thread makes the
        thread's next output suspect)."""
        self.armed[ctypes.c_uint32(tid)] = ctypes.c_uint64(ARMED if armed else committed_seq)

    def end_outputs_held(self) -> None:
        """No connection accepted so far has its outputs held any more: inputs on them hold
        their threads from now on (after a leadership, its connections are not the log's). And
        no input so far makes a thread's output suspect."""
        from bcc import libbcc

        for key, leaf in self._socket_entries():
            if leaf.outputs_held:
                plain = self.socks.Leaf(leaf.conn, leaf.kind, 0)
                libbcc.lib.bpf_update_elem(self.socks.map_fd, ctypes.byref(key), ctypes.byref(plain),
                                           BPF_EXIST)  # never for a socket closed meanwhile
        self.bpf[b"last_input"].clear()

    def add_socket(self, tgid: int, fd: int, kind: int, conn: int | None = None) -> int:
        """Track an fd found at attach time unless the probes already track it; returns its
        conn id (0 for listeners): ``conn`` if given (the socket's id in another process that
        holds it too), else a new one."""
        from bcc import libbcc

        key = self.socks.Key(tgid, fd)
        if kind == SOCK_LISTEN:
            conn = 0
        new = conn is None
        if new:
            conn = self._prefill_next
        leaf = self.socks.Leaf(conn, kind, 0)
        rc = libbcc.lib.bpf_update_elem(
            self.socks.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST
        )
        if rc == 0:
            if new:
                self._prefill_next += 1
            self._raise_top_fd(tgid, fd)
            return conn
        existing = self.socks.get(key)
        return existing.conn if existing is not None else 0

    def copy_sockets(self, from_tgid: int, to_tgid: int) -> list[tuple[int, int]]:
        """A forked child holds its parent's sockets under the same conn ids; returns the
        (fd, conn) of each connection's descriptor it copied."""
        copied = []
        for key, leaf in self._socket_entries():
            if key.tgid == from_tgid:
                self.socks[self.socks.Key(to_tgid, key.fd)] = self.socks.Leaf(
                    leaf.conn, leaf.kind, leaf.outputs_held)
                if leaf.kind == SOCK_CONN:
                    copied.append((key.fd, leaf.conn))
                self._raise_top_fd(to_tgid, key.fd)
        return copied

    def _raise_top_fd(self, tgid: int, fd: int) -> None:
        """The highest fd tracked for ``tgid``, as far as close_range looks (bpf/sockets.c)."""
        key = ctypes.c_uint32(tgid)
        top = self.top_fd.get(key)
        if top is None or top.value < fd:
            self.top_fd[key] = ctypes.c_uint32(fd)

    def close_range(self, tgid: int, first: int, last: int) -> list[tuple[int, int]]:
        """Take ``tgid``'s sockets numbered ``first`` to ``last`` out of the map (close_range
        closed them, beyond what its probe took out); returns the (conn, fd) of each
        connection's descriptor among them."""
        closed = []
        for key, leaf in self._socket_entries():
            if key.tgid == tgid and first <= key.fd <= last:
                # not if a probe took it out meanwhile, and reported its close then
                gone = discard(self.socks, key)
                if gone and leaf.kind == SOCK_CONN:
                    closed.append((leaf.conn, key.fd))
        return closed

    def drop_socket(self, tgid: int, fd: int) -> None:
        discard(self.socks, self.socks.Key(tgid, fd))

    def sockets_of(self, tgid: int) -> dict[int, tuple[int, int]]:
        """fd -> (conn, kind) for a tgid."""
        return {k.fd: (v.conn, v.kind) for k, v in self._socket_entries() if k.tgid == tgid}

    def _socket_entries(self) -> list[tuple]:
        """Every entry of the socket map. Read in one batch where the kernel can (0.35 µs an
        entry against 2.5 µs for a lookup per key: a forking server's every fork, exec and exit
        reads it); bcc raises a bare Exception where it cannot."""
        try:
            return list(self.socks.items_lookup_batch())
        except Exception:
            return list(self.socks.items())

    def lost_events(self) -> int:
        return int(self.counters[ctypes.c_int(2)].value)

    def reset(self) -> None:
        """Back to as loaded, for another tracer: every process, thread and socket forgotten,
        the counters at zero, and records not read yet dropped. (Compiling takes seconds: a
        caller that attaches one tracer after another compiles once.)"""
        for idx in self._slots_held:
            self.tgid_slots[ctypes.c_uint32(idx)] = self.tgid_slots.Leaf(0, 0)
        self._slots_held.clear()
        maps = [b"tgids", b"tids", b"socks", b"armed", b"last_input", b"top_fd", b"counters",
                b"unwoken"] + ([b"busy", b"tallies"] if self.serialize else [])
        for name in maps:
            self.bpf[name].clear()
        self._prefill_next = PREFILL_CONN_BASE + 1
        self._callback = _drop_record
        if self._events_fd is not None:
            self.consume()

    def close(self) -> None:
        self.reset()  # first: no probe reports or stops anything while they detach
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        # Each detach waits for the kernel's tracepoint grace periods (a syscall tracepoint may
        # fault); detaches made at once share them: 0.65-0.71 against 1.31-1.32 s for the 18.
        tracepoints = list(self.bpf.tracepoint_fds)
        with ThreadPoolExecutor(len(tracepoints) or 1) as pool:
            list(pool.map(self.bpf.detach_tracepoint, tracepoints))
        self.bpf.cleanup()


def _drop_record(_header: tuple, _payload: bytes) -> None:
    pass


def discard(table: Any, key: Any) -> bool:
    """Delete ``key`` from a BPF map if it is there; whether it was. One syscall: a map's
    ``pop(key, None)`` looks the key up first, and raises KeyError if a probe deletes the entry
    between the lookup and the delete."""
    from bcc import libbcc

    return libbcc.lib.bpf_delete_elem(table.map_fd, ctypes.byref(key)) == 0


def _ensure_tracefs() -> None:
    """bcc needs the syscall tracepoints' formats; `ip netns exec` mounts a /sys without them."""
    if os.path.isdir("/sys/kernel/tracing/events/syscalls") or os.geteuid() != 0:
        return
    import subprocess

    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True)
