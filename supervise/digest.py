"""Output checking: a running crc32 of what the server wrote on each connection.

Every node digests its own server's output stream per connection. The leader puts its digest
at a byte offset into the log; each node compares its own at the same offset. The digest is of
the byte stream, so it does not depend on how a copy split its writes. Once a write was captured
only in part (longer than the snap length, or a writev past its first buffer) the stream's
digest stops: later offsets are "unverifiable" rather than compared, on every node alike.

A follower keeps the digest at the end of each write only until a check passes it (the leader
logs a connection's digests in offset order), so what it holds is the output of the last half
second or so, however long the connection lives. The leader keeps none: it only logs its latest.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("supervise")

MAX_UNCHECKED = 4096  # digests kept per connection ahead of its checks; older ones go unverified
SHOWN = 48  # bytes of the last input and reply that a divergence report quotes


@dataclass
class StreamDigest:
    offset: int = 0
    crc: int = 0
    latest: tuple[int, int] = (0, 0)  # (offset, crc), replaced whole: other threads read it
    # (offset, crc) at the end of each write not yet passed by a check; None: none kept
    checkpoints: deque[tuple[int, int]] | None = field(default_factory=deque)
    complete_until: int | None = None  # offset where the first partly captured write began
    # for the report of a divergence: how the last input and the last write began
    last_input: bytes = b""
    last_write: tuple[int, bytes] = (0, b"")  # (offset where it ended, its first bytes)

    def add(self, data: bytes, length: int) -> None:
        if self.checkpoints is not None:
            self.last_write = (self.offset + length, data[:SHOWN + 1])
        if self.complete_until is not None:
            self.offset += length
            return
        if len(data) != length:
            self.complete_until = self.offset
            self.offset += length
            return
        self.crc = zlib.crc32(data, self.crc)
        self.offset += length
        self.latest = (self.offset, self.crc)
        if self.checkpoints is not None:
            self.checkpoints.append(self.latest)
            if len(self.checkpoints) > MAX_UNCHECKED:
                self.checkpoints.popleft()

    def crc_at(self, offset: int) -> int | None:
        """The digest up to ``offset`` if a write ended there; those before it are dropped."""
        kept = self.checkpoints
        if kept is None:
            return None
        while kept and kept[0][0] < offset:
            kept.popleft()
        return kept[0][1] if kept and kept[0][0] == offset else None


@dataclass
class PendingCheck:
    offset: int
    crc: int


class OutputChecker:
    """Compares this node's output digests with the ones the leader logged."""

    def __init__(self) -> None:
        self.streams: dict[object, StreamDigest] = {}
        self.pending: dict[object, deque[PendingCheck]] = {}
        self.checks = 0
        self.mismatches = 0
        self.unverifiable = 0
        self.first_mismatch: str | None = None
        self._lock = threading.Lock()  # outputs come from the tracer thread, expectations from the log

    def output(self, key: object, data: bytes, length: int, checked: bool = True) -> None:
        """``checked=False``: a stream nobody checks here (the leader's own connections)."""
        with self._lock:
            self._stream(key, checked).add(data, length)
            self._settle(key)

    def input(self, key: object, data: bytes) -> None:
        """An input replayed on the connection: quoted should its next output differ."""
        with self._lock:
            self._stream(key).last_input = data[:SHOWN + 1]

    def expect(self, key: object, offset: int, crc: int) -> None:
        with self._lock:
            self.pending.setdefault(key, deque()).append(PendingCheck(offset, crc))
            self._settle(key)

    def digest(self, key: object) -> tuple[int, int]:
        """(offset, crc) of the stream's digested prefix: what the leader logs."""
        stream = self.streams.get(key)
        return stream.latest if stream else (0, 0)

    def forget(self, key: object) -> None:
        """The connection ended: checks its output never reached can no longer be made."""
        with self._lock:
            self.streams.pop(key, None)
            self.unverifiable += len(self.pending.pop(key, ()))

    def _stream(self, key: object, checked: bool = True) -> StreamDigest:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = StreamDigest(checkpoints=deque() if checked else None)
        return stream

    def _settle(self, key: object) -> None:
        checks = self.pending.get(key)
        stream = self.streams.get(key)
        if not checks:
            return
        offset = stream.offset if stream else 0
        while checks and checks[0].offset <= offset:
            check = checks.popleft()
            mine = stream.crc_at(check.offset) if stream else (0 if check.offset == 0 else None)
            if stream and stream.complete_until is not None and check.offset > stream.complete_until:
                mine = None
            if mine is None:
                self.unverifiable += 1
            elif mine == check.crc:
                self.checks += 1
            else:
                if self.first_mismatch is None:
                    self.first_mismatch = (
                        f"connection {key}: output up to byte {check.offset} has crc32 {mine:08x} "
                        f"here but {check.crc:08x} on the leader" + _quoted(stream, check.offset)
                    )
                self.checks += 1
                self.mismatches += 1


def _quoted(stream: StreamDigest | None, offset: int) -> str:
    """How the last input and the write that ended at ``offset`` began, as far as known: a reply
    that lists a hash table, or tells the time, shows for what it is."""
    if stream is None:
        return ""
    quoted = []
    if stream.last_input:
        quoted.append(f"the last input on it began {_show(stream.last_input)}")
    ended, head = stream.last_write
    if ended == offset and head:
        quoted.append(f"the write of this copy that ended at that byte began {_show(head)}")
    return f" ({'; '.join(quoted)})" if quoted else ""


def _show(head: bytes) -> str:
    return repr(head[:SHOWN])[1:] + ("..." if len(head) > SHOWN else "")


class Divergence:
    """Whether this copy's output differed from the leader's, and why; counts the checks made
    into the node's metrics and says once, loudly, when the copy diverged."""

    def __init__(self, checker: OutputChecker, metrics, on_diverged=lambda: None) -> None:
        self.checker = checker
        self.metrics = metrics
        self.on_diverged = on_diverged
        self.diverged = False
        self.reason: str | None = None
        self._checks_reported = 0
        self._unverifiable_reported = 0
        self._lock = threading.Lock()

    def check(self) -> None:
        with self._lock:  # called on the tracer thread and on the delivery thread
            new_checks = self.checker.checks - self._checks_reported
            if new_checks:
                self._checks_reported += new_checks
                self.metrics.digest_checks.inc(new_checks)
            unverifiable = self.checker.unverifiable - self._unverifiable_reported
            if unverifiable:
                self._unverifiable_reported += unverifiable
                self.metrics.digests_unverifiable.inc(unverifiable)
            if self.checker.mismatches and not self.diverged:
                self.diverged = True
                self.reason = self.checker.first_mismatch or "output digests differ"
                self.metrics.divergences.inc(self.checker.mismatches)
                self.metrics.diverged.set(1)
                log.error("DIVERGED: %s; this node stops applying the log and is out of service",
                          self.reason)
                self.on_diverged()
