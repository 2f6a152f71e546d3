"""Binary layout of log entries, shared by the RDMA log regions and the segment files.

An entry record is::

    index u64 | ballot u64 | length u32 | kind u8 | pad[3] | crc32 u32 | pad[4]   (32 bytes)
    payload (length bytes, zero-padded to a multiple of 8)
    canary u64

The crc covers the first 24 header bytes and the payload. A reader accepts a record only when
the canary is in place and the crc matches, so a torn or partial write is never taken for an
entry. Records are 8-byte aligned.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

HEADER = struct.Struct("<QQIB3xI4x")
HEAD_PREFIX = struct.Struct("<QQIB3x")
CANARY = 0x5AFE_C0DE_CAFE_F00D
CANARY_BYTES = struct.pack("<Q", CANARY)
HEADER_SIZE = HEADER.size  # 32
MAX_PAYLOAD = 64 << 20

KIND_NOOP = 0
KIND_DATA = 1
KINDS = (KIND_NOOP, KIND_DATA)


class Entry(NamedTuple):
    index: int
    ballot: int
    kind: int
    payload: bytes


class CorruptRecord(ValueError):
    """A record failed validation; ``reason`` says which check failed."""

    def __init__(self, reason: str, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated  # the record runs past the end of the buffer


def padded(n: int) -> int:
    return (n + 7) & ~7


def encode(entry: Entry) -> bytes:
    payload = entry.payload
    n = len(payload)
    prefix = HEAD_PREFIX.pack(entry.index, entry.ballot, n, entry.kind)
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    pad = padded(n) - n
    return b"".join((HEADER.pack(entry.index, entry.ballot, n, entry.kind, crc), payload,
                     b"\0" * pad, CANARY_BYTES))


def encode_many(entries: list[Entry]) -> bytes:
    return b"".join(encode(e) for e in entries)


def decode(buf: bytes | memoryview, off: int = 0, limit: int | None = None) -> tuple[Entry, int]:
    """Decode the record at ``off``; return (entry, offset after it) or raise CorruptRecord."""
    end = len(buf) if limit is None else limit
    if off + HEADER_SIZE > end:
        raise CorruptRecord("header runs past the end", truncated=True)
    index, ballot, n, kind, crc = HEADER.unpack_from(buf, off)
    if n > MAX_PAYLOAD:
        raise CorruptRecord(f"implausible length {n}")
    if kind not in KINDS:
        raise CorruptRecord(f"unknown kind {kind}")
    p = off + HEADER_SIZE
    nxt = p + padded(n) + 8
    if nxt > end:
        raise CorruptRecord("record runs past the end", truncated=True)
    if bytes(buf[nxt - 8:nxt]) != CANARY_BYTES:
        raise CorruptRecord("canary missing")
    payload = bytes(buf[p:p + n])
    if zlib.crc32(payload, zlib.crc32(HEAD_PREFIX.pack(index, ballot, n, kind))) != crc:
        raise CorruptRecord("checksum mismatch")
    return Entry(index, ballot, kind, payload), nxt


def decode_all(buf: bytes | memoryview) -> list[Entry]:
    """Decode back-to-back records filling ``buf`` exactly."""
    out: list[Entry] = []
    off = 0
    while off < len(buf):
        e, off = decode(buf, off)
        out.append(e)
    return out
