"""The ``verbs`` provider: a thin layer over pyverbs (rdma-core) for real RDMA devices.

Chosen only when ``ibv_devices`` lists a device (ConnectX, EFA, rxe, siw, ...). Regions are
registered on our own anonymous mmap (``MR(pd, length, access, address=...)``) so ``buf`` is a
zero-copy memoryview. Queue pairs are RC; the cm handshake carries qp_num, PSN, LID and GID and
moves them INIT -> RTR -> RTS with the values of ibv_rc_pingpong (mtu from the port, timeout 14,
retry_cnt 7, rnr_retry 7). A dead peer is found by the RNIC: the next work request completes with
RETRY_EXC_ERR after about (retry_cnt + 1) * 4.096 us * 2^timeout = 0.54 s, and the QP enters ERR.

Waiting: pyverbs' ``CompChannel.get_cq_event`` holds the GIL, so ``wait`` selects on the
channel's file descriptor (found once, when the channel is created) with the timeout and only
then consumes the event; if that descriptor cannot be identified it polls with a backoff of at
most 1 ms.
"""

from __future__ import annotations

import mmap
import os
import random
import select
import socket
import time

from pyverbs import enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ, CompChannel
from pyverbs.device import Context as PvContext
from pyverbs.device import get_device_list
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

from . import metrics
from .softcq import buffer_address
from .verbs import (
    Access,
    CompletionQueue,
    Context,
    MemoryRegion,
    ProtectionDomain,
    QPState,
    QueuePair,
    VerbsError,
    WCOpcode,
    WCStatus,
    WorkCompletion,
)

PORT = int(os.environ.get("RDMA_PORT", "1"))
GID_INDEX = int(os.environ.get("RDMA_GID_INDEX", "0"))
MAX_WR = 1024


def _err(what: str, ex: Exception) -> VerbsError:
    return VerbsError(f"{what}: {ex}")


class VerbsMR(MemoryRegion):
    def __init__(self, pd: VerbsPD, length: int, access: Access) -> None:
        self._mm = mmap.mmap(-1, length)
        self.addr = buffer_address(self._mm)
        try:
            self.mr = MR(pd.pd, length, int(access), address=self.addr)
        except Exception as ex:
            raise _err("ibv_reg_mr", ex) from ex
        self.length, self.access = length, Access(access)
        self.lkey, self.rkey = self.mr.lkey, self.mr.rkey
        self._view = memoryview(self._mm)[:length]

    @property
    def buf(self) -> memoryview:
        return self._view

    def close(self) -> None:
        self.mr.close()


class VerbsPD(ProtectionDomain):
    def __init__(self, ctx: VerbsContext) -> None:
        self.ctx = ctx
        self.pd = PD(ctx.ctx)

    def reg_mr(self, length: int, access: Access) -> MemoryRegion:
        return VerbsMR(self, length, access)

    def close(self) -> None:
        self.pd.close()


def _new_fds(before: set[str]) -> list[int]:
    return [int(fd) for fd in set(os.listdir("/proc/self/fd")) - before]


class VerbsCQ(CompletionQueue):
    def __init__(self, ctx: VerbsContext, depth: int) -> None:
        before = set(os.listdir("/proc/self/fd"))
        self.channel = CompChannel(ctx.ctx)
        self._fd = None
        for fd in _new_fds(before):
            try:
                if "infinibandevent" in os.readlink(f"/proc/self/fd/{fd}"):
                    self._fd = fd
            except OSError:
                pass
        self.cq = CQ(ctx.ctx, depth, None, self.channel, 0)
        self._stats = ctx.stats

    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        n, wcs = self.cq.poll(max_entries)
        out = []
        for wc in wcs[:n]:
            imm = socket.ntohl(wc.imm_data) if wc.wc_flags & e.IBV_WC_WITH_IMM else None
            status = WCStatus(wc.status)
            if status is not WCStatus.SUCCESS:
                self._stats[2] += 1
            out.append(WorkCompletion(wc.wr_id, status, WCOpcode(wc.opcode), wc.qp_num, wc.byte_len, imm))
        return out

    def wait(self, timeout: float | None = None, max_entries: int = 16,
             spin: float | None = None) -> list[WorkCompletion]:
        """``spin`` is not used: a device's queue is polled once, then armed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 20e-6
        while True:
            out = self.poll(max_entries)
            if out:
                return out
            self.cq.req_notify()
            out = self.poll(max_entries)  # closes the race with req_notify
            if out:
                return out
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return []
            if self._fd is not None:
                r, _, _ = select.select([self._fd], [], [], min(left, 1.0))
                if r:
                    self.channel.get_cq_event(self.cq)
                    self.cq.ack_events(1)
            else:
                time.sleep(min(backoff, left))
                backoff = min(backoff * 2, 0.001)

    def close(self) -> None:
        self.cq.close()
        self.channel.close()


class VerbsQP(QueuePair):
    def __init__(self, ctx: VerbsContext, pd: VerbsPD, scq: VerbsCQ, rcq: VerbsCQ) -> None:
        self._ctx = ctx
        cap = QPCap(max_send_wr=MAX_WR, max_recv_wr=MAX_WR, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=scq.cq, rcq=rcq.cq, cap=cap)
        attr = QPAttr(port_num=PORT)
        attr.qp_access_flags = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ)
        try:
            self.qp = QP(pd.pd, init, attr)  # RC with an attr: returned in INIT
        except Exception as ex:
            raise _err("ibv_create_qp", ex) from ex
        self.qp_num = self.qp.qp_num
        self.psn = random.getrandbits(24)
        self._stats = ctx.stats
        self.sock: socket.socket | None = None

    def params(self) -> dict:
        return {
            "qp_num": self.qp_num,
            "psn": self.psn,
            "lid": self._ctx.port_attr.lid,
            "gid": str(self._ctx.ctx.query_gid(PORT, GID_INDEX)),
        }

    def connect(self, peer: dict) -> None:
        attr = QPAttr(port_num=PORT)
        attr.path_mtu = self._ctx.port_attr.active_mtu
        attr.dest_qp_num = int(peer["qp_num"])
        attr.rq_psn = int(peer["psn"])
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gr = GlobalRoute(dgid=GID(str(peer["gid"])), sgid_index=GID_INDEX)
        attr.ah_attr = AHAttr(port_num=PORT, is_global=1, gr=gr, dlid=int(peer["lid"]))
        try:
            self.qp.to_rts(attr)
        except Exception as ex:
            raise _err("ibv_modify_qp to RTS", ex) from ex

    @property
    def state(self) -> QPState:
        attr, _ = self.qp.query(e.IBV_QP_STATE)
        return QPState(attr.qp_state)

    def _post(self, wr: SendWR) -> None:
        try:
            self.qp.post_send(wr)
        except Exception as ex:
            raise _err("ibv_post_send", ex) from ex

    def _wr(
        self, local: VerbsMR, off: int, length: int, wr_id: int, opcode: int, imm: int | None, signaled: bool
    ) -> SendWR:
        sge = SGE(local.addr + off, length, local.lkey)
        flags = e.IBV_SEND_SIGNALED if signaled else 0
        wr = SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge], send_flags=flags)
        if imm is not None:
            wr.imm_data = socket.htonl(imm & 0xFFFFFFFF)
        return wr

    def post_write(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        remote_addr: int,
        rkey: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        op = e.IBV_WR_RDMA_WRITE if imm_data is None else e.IBV_WR_RDMA_WRITE_WITH_IMM
        wr = self._wr(local, local_offset, length, wr_id, op, imm_data, signaled)
        wr.set_wr_rdma(int(rkey), int(remote_addr))
        self._post(wr)
        self._stats[0] += 1
        self._stats[1] += length

    def post_read(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        remote_addr: int,
        rkey: int,
        wr_id: int,
        signaled: bool = True,
    ) -> None:
        wr = self._wr(local, local_offset, length, wr_id, e.IBV_WR_RDMA_READ, None, signaled)
        wr.set_wr_rdma(int(rkey), int(remote_addr))
        self._post(wr)

    def post_send(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None:
        op = e.IBV_WR_SEND if imm_data is None else e.IBV_WR_SEND_WITH_IMM
        self._post(self._wr(local, local_offset, length, wr_id, op, imm_data, signaled))

    def post_recv(self, local: MemoryRegion, local_offset: int, length: int, wr_id: int) -> None:
        wr = RecvWR(wr_id=wr_id, num_sge=1, sg=[SGE(local.addr + local_offset, length, local.lkey)])
        try:
            self.qp.post_recv(wr)
        except Exception as ex:
            raise _err("ibv_post_recv", ex) from ex

    def close(self) -> None:
        self.qp.close()
        if self.sock is not None:
            self.sock.close()


class VerbsContext(Context):
    provider = "verbs"

    def __init__(self, name: str | None = None) -> None:
        try:
            devices = get_device_list()
        except Exception as ex:  # ENOSYS without kernel support
            raise VerbsError(f"no RDMA device (ibv_devices lists none): {ex}") from ex
        if not devices:
            raise VerbsError("no RDMA device (ibv_devices lists none)")
        if name is None:
            name = os.environ.get("RDMA_DEVICE") or devices[0].name.decode()
        self.ctx = PvContext(name=name)
        self.port_attr = self.ctx.query_port(PORT)
        self.stats = metrics.stats("verbs")
        self._objs: list = []

    def alloc_pd(self) -> ProtectionDomain:
        pd = VerbsPD(self)
        self._objs.append(pd)
        return pd

    def create_cq(self, depth: int = 1024) -> CompletionQueue:
        cq = VerbsCQ(self, depth)
        self._objs.append(cq)
        return cq

    def _cm_prepare(self, pd: VerbsPD, send_cq: VerbsCQ, recv_cq: VerbsCQ) -> VerbsQP:
        qp = VerbsQP(self, pd, send_cq, recv_cq)
        self._objs.append(qp)
        return qp

    def _cm_params(self, qp: VerbsQP, sock: socket.socket, initiator: bool) -> dict:
        return qp.params()

    def _cm_complete(self, qp: VerbsQP, sock: socket.socket, peer: dict, initiator: bool) -> VerbsQP:
        try:
            qp.connect(peer)
        except (KeyError, TypeError, ValueError) as ex:
            raise VerbsError(f"malformed verbs connection parameters: {ex!r}") from ex
        qp.sock = sock  # not needed for liveness (the RNIC finds a dead peer); closed with the QP
        return qp

    def close(self) -> None:
        for obj in reversed(self._objs):
            try:
                obj.close()
            except Exception:  # pyverbs closes dependents itself
                pass
        self.ctx.close()
