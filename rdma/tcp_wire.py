"""The tcp provider's wire format: 32-byte headers, opcodes and limits."""

from __future__ import annotations

import socket
import struct

from .verbs import Access

HDR = struct.Struct("<BBHIQQII")  # op, flags, status, imm, seq, addr, rkey, length
WRITE, READ, SEND, ACK, READ_RESP = 1, 2, 3, 0x81, 0x82
F_IMM = 1
MAX_SEND_WR = 4096
MAX_MSG = 1 << 30
RNR_TIMEOUT = 0.1
ACC_REMOTE_WRITE, ACC_REMOTE_READ = int(Access.REMOTE_WRITE), int(Access.REMOTE_READ)
SMALL = 65536
U64, U32 = (1 << 64) - 1, (1 << 32) - 1
NONBLOCK = socket.MSG_DONTWAIT


class Gone(Exception):
    """The connection ended or the peer broke the protocol."""


class RetryExceeded(Exception):
    pass
