"""The replica's log on disk: a directory of segment files of codec records.

A segment is named ``seg-<first index, 20 digits>.log`` and holds records back to back, indices
contiguous. Memory stays bounded: per segment only every ``SPARSE``-th record offset is kept, and
ballots are kept as runs (ballots only grow along a log, so one run per leadership).

Opening validates every record. Any bad record raises :class:`SegmentCorruptError` naming the
file and the offset, with one exception: a torn tail at the very end of the *last* segment (a
record that runs past the end of the file, or a tail of zero bytes), which is what a crash during
an unacknowledged append leaves behind. That tail is truncated away and logged.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from consensus import codec
from consensus.codec import CorruptRecord, Entry

log = logging.getLogger(__name__)

SPARSE = 64
SEGMENT_BYTES = 64 << 20


class SegmentCorruptError(Exception):
    """A segment file failed validation at start; the message names the file and the offset."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"corrupt log segment {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass
class Segment:
    path: Path
    first: int
    last: int  # first - 1 when empty
    size: int
    sparse: array = field(default_factory=lambda: array("Q"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentLog:
    """Append-only segment files with truncation of a suffix. Not thread-safe by itself."""

    def __init__(self, directory: Path, fsync: bool = True, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._firsts: list[int] = []
        self._run_first: list[int] = []
        self._run_ballot: list[int] = []
        self._fd: int | None = None
        self._dirty = False
        self._buf = bytearray()  # appended records not yet handed to the kernel
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()

    # ---- opening ------------------------------------------------------------------------------
    def _open(self) -> None:
        paths = sorted(p for p in self.dir.glob("seg-*.log"))
        expected = 1
        for n, path in enumerate(paths):
            try:
                first = int(path.name[4:-4])
            except ValueError as exc:
                raise SegmentCorruptError(path, 0, "file name is not seg-<index>.log") from exc
            if first != expected:
                raise SegmentCorruptError(path, 0, f"segment starts at index {first}, expected {expected}")
            seg = self._scan(path, first, is_last=(n == len(paths) - 1))
            if seg.last < seg.first and n != len(paths) - 1:
                raise SegmentCorruptError(path, 0, "empty segment before the last one")
            self.segments.append(seg)
            self._firsts.append(seg.first)
            expected = seg.last + 1
        if not self.segments:
            self._new_segment(1)
        else:
            self._fd = os.open(self.segments[-1].path, os.O_RDWR | os.O_APPEND)

    def _scan(self, path: Path, first: int, is_last: bool) -> Segment:
        size = path.stat().st_size
        seg = Segment(path, first, first - 1, 0)
        if size == 0:
            return seg
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            off = 0
            while off < size:
                try:
                    e, nxt = codec.decode(mm, off, size)
                except CorruptRecord as exc:
                    tail_zero = not any(mm[off:size])
                    if is_last and (exc.truncated or tail_zero):
                        log.warning("%s: truncating torn tail at offset %d (%s, %d bytes)",
                                    path, off, exc.reason, size - off)
                        break
                    raise SegmentCorruptError(path, off, exc.reason) from None
                if e.index != seg.last + 1:
                    raise SegmentCorruptError(path, off, f"index {e.index} where {seg.last + 1} expected")
                if self._run_ballot and e.ballot < self._run_ballot[-1]:
                    raise SegmentCorruptError(path, off, f"ballot {e.ballot} decreases along the log")
                self._note(seg, e, off)
                off = nxt
        if off < size:
            with open(path, "r+b") as f:
                f.truncate(off)
                os.fsync(f.fileno())
        seg.size = off
        return seg

    def _note(self, seg: Segment, e: Entry, off: int) -> None:
        if (e.index - seg.first) % SPARSE == 0:
            seg.sparse.append(off)
        if not self._run_ballot or self._run_ballot[-1] != e.ballot:
            self._run_first.append(e.index)
            self._run_ballot.append(e.ballot)
        seg.last = e.index

    def _new_segment(self, first: int) -> None:
        path = self.dir / f"seg-{first:020d}.log"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        seg = Segment(path, first, first - 1, 0)
        self.segments.append(seg)
        self._firsts.append(first)
        if self.fsync:
            _fsync_dir(self.dir)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def last_index(self) -> int:
        return self.segments[-1].last

    @property
    def size_bytes(self) -> int:
        return sum(seg.size for seg in self.segments)

    @property
    def last_ballot(self) -> int:
        return self._run_ballot[-1] if self._run_ballot else 0

    def ballot_at(self, index: int) -> int:
        """Ballot of the entry at ``index`` (0 for index 0); index must be <= last_index."""
        if index <= 0:
            return 0
        k = bisect.bisect_right(self._run_first, index) - 1
        return self._run_ballot[k]

    def first_index_of_ballot(self, index: int) -> int:
        """First index of the ballot run containing ``index`` (for fast conflict back-off)."""
        k = bisect.bisect_right(self._run_first, index) - 1
        return self._run_first[k] if k >= 0 else 1

    def read_range(self, lo: int, hi: int, max_bytes: int = 1 << 20) -> list[Entry]:
        """Entries lo..hi inclusive (stopping early once ``max_bytes`` of payload are read)."""
        out: list[Entry] = []
        total = 0
        for e in self._iter_from(lo):
            if e.index > hi:
                break
            out.append(e)
            total += len(e.payload) + 48
            if total >= max_bytes:
                break
        return out

    def _iter_from(self, lo: int) -> Iterator[Entry]:
        if lo > self.last_index or lo < 1:
            return
        self.flush()
        k = bisect.bisect_right(self._firsts, lo) - 1
        for seg in self.segments[k:]:
            if seg.last < seg.first:
                continue
            slot = max(0, (lo - seg.first) // SPARSE)
            off = seg.sparse[slot]
            with open(seg.path, "rb") as f:
                f.seek(off)
                while off < seg.size:
                    head = f.read(codec.HEADER_SIZE)
                    n = codec.HEADER.unpack_from(head)[2]
                    rest = f.read(codec.padded(n) + 8)
                    e, _ = codec.decode(head + rest)
                    off += len(head) + len(rest)
                    if e.index >= lo:
                        yield e

    # ---- mutation -----------------------------------------------------------------------------
    def append(self, entries: list[Entry], records: list[bytes] | None = None) -> None:
        """Append entries (``records``: their codec encodings, when the caller has them)."""
        if not entries:
            return
        seg = self.segments[-1]
        if seg.size >= self.segment_bytes:
            self._rotate(entries[0].index)
            seg = self.segments[-1]
        chunks = []
        off = seg.size
        for k, e in enumerate(entries):
            if e.index != seg.last + 1:
                raise ValueError(f"append of index {e.index} after {seg.last}")
            rec = records[k] if records is not None else codec.encode(e)
            chunks.append(rec)
            self._note(seg, e, off)
            off += len(rec)
        self._buf += b"".join(chunks)
        seg.size = off
        self._dirty = True
        if len(self._buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        """Hand buffered records to the kernel (page cache); ``sync`` also makes them durable."""
        if self._buf:
            assert self._fd is not None
            view = memoryview(self._buf)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            view.release()
            self._buf.clear()

    def _rotate(self, first: int) -> None:
        self.flush()
        if self._fd is not None:
            if self.fsync and self._dirty:
                os.fsync(self._fd)
            self._dirty = False
            os.close(self._fd)
        self._new_segment(first)

    def sync(self) -> None:
        self.flush()
        if self._dirty and self._fd is not None:
            self._dirty = False
            if self.fsync:
                os.fsync(self._fd)

    def truncate_from(self, index: int) -> None:
        """Remove every entry with index >= ``index``."""
        if index > self.last_index:
            return
        self.flush()
        while len(self.segments) > 1 and self.segments[-1].first >= index:
            seg = self.segments.pop()
            self._firsts.pop()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            seg.path.unlink()
            self._fd = os.open(self.segments[-1].path, os.O_RDWR | os.O_APPEND)
        seg = self.segments[-1]
        cut = seg.size
        if index <= seg.last:
            keep = index - seg.first
            slot = keep // SPARSE
            off = seg.sparse[slot] if slot < len(seg.sparse) else seg.size
            skipped = slot * SPARSE
            with open(seg.path, "rb") as f:
                f.seek(off)
                while skipped < keep:
                    head = f.read(codec.HEADER_SIZE)
                    n = codec.HEADER.unpack_from(head)[2]
                    off += codec.HEADER_SIZE + codec.padded(n) + 8
                    f.seek(off)
                    skipped += 1
            cut = off
            del seg.sparse[(keep + SPARSE - 1) // SPARSE:]
            seg.last = index - 1
        assert self._fd is not None
        os.ftruncate(self._fd, cut)
        seg.size = cut
        k = bisect.bisect_left(self._run_first, index)
        del self._run_first[k:]
        del self._run_ballot[k:]
        if self.fsync:
            os.fsync(self._fd)
            _fsync_dir(self.dir)
        self._dirty = False

    def close(self, sync: bool = True) -> None:
        """Close the open segment; ``sync=False`` drops what is buffered (a failed log)."""
        if self._fd is not None:
            if sync:
                self.sync()
            os.close(self._fd)
            self._fd = None
