"""What the supervisor writes into the replicated log.

A connection is named by (epoch, conn): the ballot of the leadership that accepted it and the
tracer's connection id on that leader, so ids never collide across failovers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

_HEADER = struct.Struct(">BQQ")
_DIGEST = struct.Struct(">QI")


class Kind(IntEnum):
    CONNECT = 1
    DATA = 2
    CLOSE = 3
    DIGEST = 4
    BARRIER = 5


@dataclass(frozen=True)
class Entry:
    kind: Kind
    epoch: int
    conn: int
    data: bytes = b""
    offset: int = 0  # DIGEST: output bytes covered
    crc: int = 0     # DIGEST: crc32 of the leader's output up to offset

    @property
    def cid(self) -> tuple[int, int]:
        return self.epoch, self.conn

    def encode(self) -> bytes:
        head = _HEADER.pack(self.kind, self.epoch, self.conn)
        if self.kind is Kind.DIGEST:
            return head + _DIGEST.pack(self.offset, self.crc)
        return head + self.data


class EntryError(ValueError):
    """A log payload that is not a supervisor entry."""


def decode(payload: bytes) -> Entry:
    if len(payload) < _HEADER.size:
        raise EntryError(f"entry of {len(payload)} bytes is shorter than its header")
    kind, epoch, conn = _HEADER.unpack_from(payload)
    try:
        kind = Kind(kind)
    except ValueError:
        raise EntryError(f"unknown entry kind {kind}") from None
    body = payload[_HEADER.size:]
    if kind is Kind.DIGEST:
        if len(body) != _DIGEST.size:
            raise EntryError(f"digest entry body of {len(body)} bytes, expected {_DIGEST.size}")
        offset, crc = _DIGEST.unpack(body)
        return Entry(kind, epoch, conn, offset=offset, crc=crc)
    if kind in (Kind.CONNECT, Kind.CLOSE) and body:
        raise EntryError(f"{kind.name} entry with a {len(body)}-byte body")
    return Entry(kind, epoch, conn, data=body)
