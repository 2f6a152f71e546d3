"""Frames written into a peer's inbox ring, and the protocol message bodies they carry.

A frame is ``len u32 | type u8 | pad[3] | epoch u64 | pos u64 | crc32 u32 | pad[4]`` (32 bytes),
the body (padded to 8) and a canary u64. ``epoch`` names the writer's connection (a frame left
over from an older connection is ignored), ``pos`` is the frame's position in the writer's ring
(for flow control). The receiver decodes a frame only at the offset announced by the immediate
data of the WRITE_WITH_IMM that carried it, and checks canary and crc before using it.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from consensus import codec

FRAME = struct.Struct("<IB3xQQI4x")
FRAME_PREFIX = struct.Struct("<IB3xQQ")
FRAME_HEADER = FRAME.size
CANARY_BYTES = codec.CANARY_BYTES

APPEND = 1
APPEND_RESP = 2
VOTE_REQ = 3
VOTE_RESP = 4
TIMEOUT_NOW = 5  # body: a ballot (enc_ballot), as TAKEOVER_ASK's and TAKEOVER_GO's
PREVOTE_REQ = 6  # bodies as VOTE_REQ / VOTE_RESP
PREVOTE_RESP = 7
TAKEOVER_ASK = 8  # the successor asks whether the hand-over still holds
TAKEOVER_GO = 9  # and the leader says it does (transfer.py)

_APPEND = struct.Struct("<QQQQI4x")
_APPEND_RESP = struct.Struct("<QQQB3xI")
_VOTE_REQ = struct.Struct("<QQQ")
_VOTE_RESP = struct.Struct("<QB7x")
_BALLOT = struct.Struct("<Q")


class BadFrame(ValueError):
    pass


def frame_size(body_len: int) -> int:
    return FRAME_HEADER + codec.padded(body_len) + 8


def encode_frame(mtype: int, epoch: int, pos: int, body: bytes) -> bytes:
    n = len(body)
    crc = zlib.crc32(body, zlib.crc32(FRAME_PREFIX.pack(n, mtype, epoch, pos)))
    return b"".join((FRAME.pack(n, mtype, epoch, pos, crc), body, b"\0" * (codec.padded(n) - n),
                     CANARY_BYTES))


def decode_frame(buf: memoryview, off: int) -> tuple[int, int, int, bytes]:
    """Return (type, epoch, pos, body) of the frame at ``off`` or raise BadFrame."""
    if off + FRAME_HEADER > len(buf):
        raise BadFrame("header outside the ring")
    n, mtype, epoch, pos, crc = FRAME.unpack_from(buf, off)
    end = off + FRAME_HEADER + codec.padded(n) + 8
    if end > len(buf):
        raise BadFrame("frame outside the ring")
    if bytes(buf[end - 8:end]) != CANARY_BYTES:
        raise BadFrame("canary missing")
    body = bytes(buf[off + FRAME_HEADER:off + FRAME_HEADER + n])
    if zlib.crc32(body, zlib.crc32(FRAME_PREFIX.pack(n, mtype, epoch, pos))) != crc:
        raise BadFrame("checksum mismatch")
    return mtype, epoch, pos, body


class Append(NamedTuple):
    ballot: int
    commit: int
    prev_index: int
    prev_ballot: int
    entries: list[codec.Entry]


class AppendResp(NamedTuple):
    ballot: int
    index: int  # match index when ok, else the follower's hint (retry after this index)
    last_index: int
    ok: bool
    lag: int = 0  # entries the follower would apply before it could lead (at most 2**32 - 1)


class VoteReq(NamedTuple):
    ballot: int
    last_index: int
    last_ballot: int


class VoteResp(NamedTuple):
    ballot: int
    granted: bool


def enc_append(ballot: int, commit: int, prev_index: int, prev_ballot: int, records: bytes,
               count: int) -> bytes:
    return _APPEND.pack(ballot, commit, prev_index, prev_ballot, count) + records


def dec_append(body: bytes) -> Append:
    ballot, commit, prev_index, prev_ballot, count = _APPEND.unpack_from(body)
    view = memoryview(body)[_APPEND.size:]
    entries = []
    off = 0
    for _ in range(count):
        # every entry is checked (canary + crc): a torn entry is never accepted
        e, off = codec.decode(view, off)
        entries.append(e)
    for k, e in enumerate(entries):
        if e.index != prev_index + 1 + k:
            raise codec.CorruptRecord("entries not contiguous")
    return Append(ballot, commit, prev_index, prev_ballot, entries)


def enc_append_resp(m: AppendResp) -> bytes:
    return _APPEND_RESP.pack(m.ballot, m.index, m.last_index, int(m.ok), min(m.lag, 0xFFFFFFFF))


def dec_append_resp(body: bytes) -> AppendResp:
    ballot, index, last, ok, lag = _APPEND_RESP.unpack_from(body)
    return AppendResp(ballot, index, last, bool(ok), lag)


def enc_vote_req(m: VoteReq) -> bytes:
    return _VOTE_REQ.pack(*m)


def dec_vote_req(body: bytes) -> VoteReq:
    return VoteReq(*_VOTE_REQ.unpack_from(body))


def enc_vote_resp(m: VoteResp) -> bytes:
    return _VOTE_RESP.pack(m.ballot, int(m.granted))


def dec_vote_resp(body: bytes) -> VoteResp:
    ballot, granted = _VOTE_RESP.unpack_from(body)
    return VoteResp(ballot, bool(granted))


def enc_ballot(ballot: int) -> bytes:
    return _BALLOT.pack(ballot)


def dec_ballot(body: bytes) -> int:
    return _BALLOT.unpack_from(body)[0]
