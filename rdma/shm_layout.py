"""Shared-memory layouts of the shm provider: the registration table and queue-pair blocks.

Registration table (one per context, 64-byte slots after a 64-byte header), per slot as u32:
[0] rkey, [1] state (1 = valid, written last, cleared first), [2] access, [3] owner fd, [4] PD id;
as u64: [3] address, [4] length, [5] inode, [6] segment size. rkey = generation << 12 | slot.

Queue-pair block (one per queue pair and side): u32 [0] state, [1] qp_num, [2..3] capacities;
u64 [8] receive-queue head (advanced by the peer), [16] its tail (by the owner), [24] inbound
completion head (by the owner), [32] its tail (by the peer); then the receive queue (32-byte
entries: wr_id, key, offset, length) and the inbound completion ring (32-byte entries: wr_id,
status | opcode << 8 | has_imm << 16, byte_len, imm). Every index is written by one side only.
"""

from __future__ import annotations

from . import segment
from .softcq import SoftMR
from .verbs import Access, QPState

NSLOTS = 4096
SLOT_BITS = 12
TABLE_SIZE = 64 + NSLOTS * 64
RQ_CAP = 1024
CQ_CAP = 4096
BLOCK_SIZE = 512 + (RQ_CAP + CQ_CAP) * 32
RNR_TIMEOUT = 0.1
RTS, ERR = int(QPState.RTS), int(QPState.ERR)
# u64 indexes inside a queue-pair block (head/tail words on separate cache lines)
RQ_HEAD, RQ_TAIL, CQ_HEAD, CQ_TAIL = 8, 16, 24, 32
RQ, CQR = 64, 64 + RQ_CAP * 4
ACC_REMOTE_WRITE, ACC_REMOTE_READ = int(Access.REMOTE_WRITE), int(Access.REMOTE_READ)


def slot32(slot: int) -> int:
    return 16 + slot * 16


class ShmMR(SoftMR):
    seg: segment.Segment
