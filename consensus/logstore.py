"""The replica's log: segment files plus a bounded cache of recent entries, and the promise file.

Thread-safety: every method takes the store's own lock, so the leader can fsync (``sync``) outside
the consensus lock while other threads keep reading; appends wait for the fsync (group commit).

Every write goes through ``_writing``: the first one the directory refuses (full, read-only,
failing) puts the store in a failed state, reported once to ``on_failure``, in which every later
write raises the same :class:`LogWriteError` without touching the files. A write is not retried:
after a failed ``write`` the file may hold part of the buffer, and after a failed ``fsync`` the
kernel may have dropped the dirty pages, so neither the buffer nor the page cache says what is on
disk. Reopening at restart does (segments.py cuts a torn tail).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

from consensus import codec
from consensus.codec import Entry
from consensus.errors import LogDirInUse, LogWriteError
from consensus.segments import SegmentCorruptError, SegmentLog

_PROMISE = struct.Struct("<QI")


class _Writing:
    """``with store._writing():`` the store's lock, and its failed state: raised at once once
    failed; an OSError inside makes it failed (reported once) and leaves as LogWriteError. A
    class, not a generator: it wraps every append and flush (0.3 against 1.0 µs a use)."""

    __slots__ = ("store",)

    def __init__(self, store: LogStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        store = self.store
        store._lock.acquire()
        if store.failed is not None:
            store._lock.release()
            raise store.failed

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: object) -> None:
        store = self.store
        try:
            if isinstance(error, OSError):
                store.failed = LogWriteError(store.dir, error)
                if store._on_failure is not None:
                    store._on_failure(store.failed)
                raise store.failed from error
        finally:
            store._lock.release()


def _lock_directory(directory: Path) -> int:
    """Hold ``directory/lock`` (flock, released when the fd closes, also by a crash) with this
    process's pid in it; LogDirInUse when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LogDirInUse(directory, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# What a cached entry takes: its payload twice (the entry and its encoded record) and about 400
# bytes of objects and dict slots around them (tracemalloc: 335 bytes an entry of 16 payload
# bytes, 532 of 60). 96 had been assumed, which let the cache take twice its budget.
def _cached_size(payload: bytes) -> int:
    return 2 * len(payload) + 400


class LogStore:
    def __init__(self, directory: Path, fsync: bool, cache_bytes: int = 16 << 20,
                 segment_bytes: int = 64 << 20,
                 on_failure: Callable[[LogWriteError], None] | None = None) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self._lock = threading.RLock()
        self.failed: LogWriteError | None = None
        self._on_failure = on_failure
        self._guard = _Writing(self)
        try:
            self._dir_lock = _lock_directory(self.dir)
        except OSError as exc:
            raise LogWriteError(self.dir, exc) from exc
        try:
            self.seg = SegmentLog(self.dir / "log", fsync=fsync, segment_bytes=segment_bytes)
        except BaseException as exc:
            os.close(self._dir_lock)
            if isinstance(exc, OSError):
                raise LogWriteError(self.dir, exc) from exc
            raise
        self._cache: dict[int, Entry] = {}
        self._recs: dict[int, bytes] = {}  # the same entries, encoded
        self._cache_first = self.seg.last_index + 1
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self.last_index = self.seg.last_index
        self.last_ballot = self.seg.last_ballot
        self.durable_index = self.last_index
        self.promised = self._load_promise()

    def _writing(self) -> _Writing:
        return self._guard

    @property
    def size_bytes(self) -> int:
        """Bytes of the log's records, on disk or buffered for it."""
        return self.seg.size_bytes

    def free_bytes(self) -> int:
        """Bytes available on the log's file system, as df counts them (without the reserve)."""
        try:
            st = os.statvfs(self.seg.dir)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    # ---- promise ------------------------------------------------------------------------------
    def _load_promise(self) -> int:
        path = self.dir / "promise"
        if not path.exists():
            return 0
        data = path.read_bytes()
        if len(data) != _PROMISE.size:
            raise SegmentCorruptError(path, 0, f"promise file has {len(data)} bytes, not {_PROMISE.size}")
        ballot, crc = _PROMISE.unpack(data)
        if zlib.crc32(data[:8]) != crc:
            raise SegmentCorruptError(path, 0, "promise checksum mismatch")
        return ballot

    def save_promise(self, ballot: int) -> None:
        """Persist the promised ballot before it is acted on (atomic rename)."""
        path = self.dir / "promise"
        tmp = self.dir / "promise.tmp"
        body = struct.pack("<Q", ballot)
        data = body + struct.pack("<I", zlib.crc32(body))
        with self._writing():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        self.promised = ballot

    # ---- log ----------------------------------------------------------------------------------
    def ballot_at(self, index: int) -> int:
        if index <= 0:
            return 0
        with self._lock:
            e = self._cache.get(index)
            return e.ballot if e is not None else self.seg.ballot_at(index)

    def first_index_of_ballot(self, index: int) -> int:
        with self._lock:
            return self.seg.first_index_of_ballot(index)

    def append(self, entries: list[Entry]) -> None:
        recs = [codec.encode(e) for e in entries]  # encoded once: for the file and for peers
        with self._writing():
            self.seg.append(entries, recs)
            for e, r in zip(entries, recs, strict=True):
                self._cache[e.index] = e
                self._recs[e.index] = r
                self._cache_bytes += _cached_size(e.payload)
            self.last_index = entries[-1].index
            self.last_ballot = entries[-1].ballot
            if not self.fsync:
                self.durable_index = self.last_index
            while self._cache_bytes > self._cache_limit and self._cache_first <= self.last_index:
                self._evict(self._cache_first)
                self._cache_first += 1

    def _evict(self, index: int) -> None:
        old = self._cache.pop(index, None)
        self._recs.pop(index, None)
        if old is not None:
            self._cache_bytes -= _cached_size(old.payload)

    def sync(self) -> int:
        """Make everything appended so far durable; return the durable index."""
        with self._writing():
            target = self.last_index
            self.seg.sync()
            self.durable_index = target
            return self.durable_index

    def flush(self) -> None:
        with self._writing():
            self.seg.flush()

    def truncate_from(self, index: int) -> None:
        with self._writing():
            self.seg.truncate_from(index)
            for i in range(index, self.last_index + 1):
                self._evict(i)
            self.last_index = self.seg.last_index
            self.last_ballot = self.seg.last_ballot
            self._cache_first = min(self._cache_first, self.last_index + 1)
            self.durable_index = min(self.durable_index, self.last_index)

    def entry(self, index: int) -> Entry | None:
        with self._lock:
            e = self._cache.get(index)
            if e is not None:
                return e
            if index > self.last_index or index < 1:
                return None
            with self._writing():  # reading may flush the buffer first
                got = self.seg.read_range(index, index)
            return got[0] if got else None

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries lo..hi (inclusive), at least one if any exist, at most ~max_bytes of payload."""
        with self._lock:
            hi = min(hi, self.last_index)
            out: list[Entry] = []
            if lo > hi:
                return out
            if lo >= self._cache_first:
                total = 0
                for i in range(lo, hi + 1):
                    e = self._cache[i]
                    out.append(e)
                    total += len(e.payload) + 48
                    if total >= max_bytes:
                        break
                return out
            with self._writing():
                return self.seg.read_range(lo, hi, max_bytes)

    def records(self, lo: int, hi: int, max_bytes: int) -> tuple[bytes, int]:
        """Encoded entries lo..hi as one blob and their count (at least one if any exist)."""
        with self._lock:
            hi = min(hi, self.last_index)
            if lo > hi:
                return b"", 0
            if lo < self._cache_first:
                with self._writing():
                    got = self.seg.read_range(lo, hi, max_bytes)
                return codec.encode_many(got), len(got)
            out = []
            total = 0
            recs = self._recs
            for i in range(lo, hi + 1):
                r = recs[i]
                out.append(r)
                total += len(r)
                if total >= max_bytes:
                    break
            return b"".join(out), len(out)

    def close(self) -> None:
        """Sync and close the files; a failed store only closes them (the failure is reported)."""
        with self._lock:
            if self.failed is None:
                with contextlib.suppress(LogWriteError), self._writing():
                    self.seg.sync()
            self.seg.close(sync=False)
            if self._dir_lock >= 0:
                os.close(self._dir_lock)  # releases the lock
                self._dir_lock = -1
