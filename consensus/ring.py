"""One direction of a replica-to-replica link: a writer's frames in the reader's inbox ring.

The reader's inbox area for one writer is ``[64-byte slot][ring]``. The writer places each frame
(wire.py) at its ring position, wrapping to the start when a frame would not fit before the end,
and posts a WRITE_WITH_IMM whose immediate is the frame's ring offset. The slot of an area holds
what its writer has consumed of the *owner's* ring at the writer's side (``epoch, position,
count`` with a crc), written back lazily by that writer: it is the owner's flow-control credit.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import zlib
from dataclasses import dataclass, field

from consensus import wire

SLOT = 64
_SLOT = struct.Struct("<QQQI")
RECV_DEPTH = 256  # receives posted per incoming queue pair
MSG_LIMIT = RECV_DEPTH - 32  # frames a writer may have unconsumed
# Failpoint for tests: this fraction of frames carrying entries is written torn (a random tail
# of the frame never reaches the peer, as when a writer dies mid-write). Off unless set.
TORN_WRITES = float(os.environ.get("CONSENSUS_FAULT_TORN_WRITES", "0") or 0)


def encode_slot(epoch: int, pos: int, count: int) -> bytes:
    body = struct.pack("<QQQ", epoch, pos, count)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_slot(raw: bytes, epoch: int) -> tuple[int, int]:
    """(consumed position, consumed count) if the slot is intact and about ``epoch``, else (0, 0)."""
    got, pos, count, crc = _SLOT.unpack(raw[:_SLOT.size])
    if got != epoch or zlib.crc32(raw[:24]) != crc:
        return 0, 0
    return pos, count


@dataclass
class Outgoing:
    """Our connection to a peer: we write into our inbox area at that peer."""

    peer: str
    conn: object
    qp: object
    staging: object  # local MR mirroring the remote area (frames stay put until consumed)
    addr: int
    length: int
    rkey: int
    epoch: int
    pos: int = 0
    sent: int = 0
    broken: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write_frame(self, mtype: int, body: bytes, credit: tuple[int, int]) -> bool | None:
        """Place and post one frame; False when the reader has no room (credit), None when it
        went out unsignaled, True when signaled (the caller then reaps the send CQ)."""
        ring = self.length - SLOT
        size = wire.frame_size(len(body))
        pos = self.pos
        off = pos % ring
        if off + size > ring:
            pos += ring - off
            off = 0
        cpos, ccnt = credit
        if pos + size - cpos > ring or self.sent - ccnt >= MSG_LIMIT:
            return False
        self.staging.buf[SLOT + off:SLOT + off + size] = wire.encode_frame(mtype, self.epoch, pos, body)
        self.sent += 1
        signaled = self.sent % 32 == 0
        length = size
        if TORN_WRITES and mtype == wire.APPEND and len(body) > 64 and random.random() < TORN_WRITES:
            length = random.randrange(wire.FRAME_HEADER + 48, size)
        self.qp.post_write(self.staging, SLOT + off, length, self.addr + SLOT + off, self.rkey,
                           wr_id=self.sent, imm_data=off, signaled=signaled)
        self.pos = pos + size
        return True if signaled else None

    def write_slot(self, raw: bytes) -> None:
        self.staging.buf[0:len(raw)] = raw
        self.qp.post_write(self.staging, 0, len(raw), self.addr, self.rkey, wr_id=0, signaled=False)


@dataclass
class Incoming:
    """A peer's connection to us: it writes into its inbox area here."""

    peer: str
    conn: object
    epoch: int
    consumed_pos: int = 0
    consumed_cnt: int = 0
    reported_pos: int = 0
    reported_cnt: int = 0
