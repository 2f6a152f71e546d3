"""The verbs-shaped API every provider implements.

Names, numbers and semantics follow ibverbs (``infiniband/verbs.h``) so that the ``verbs``
provider is a thin layer over pyverbs and the software providers (``shm``, ``tcp``) behave the
same way: reliable-connected queue pairs, one-sided WRITE/READ into registered memory regions
named by (address, rkey), completions delivered in posting order per queue pair, and a queue
pair that moves to the error state on the first failed work request, flushing the rest.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple


class WCStatus(IntEnum):
    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


class WCOpcode(IntEnum):
    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    RECV = 128
    RECV_RDMA_WITH_IMM = 129


class Access(IntFlag):
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8


class QPState(IntEnum):
    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class VerbsError(Exception):
    """A verb could not be posted or a resource could not be created (ibverbs' errno returns)."""


class WorkCompletion(NamedTuple):
    """One completed work request (a tuple: made on every completion, so it must be cheap)."""

    wr_id: int
    status: WCStatus
    opcode: WCOpcode
    qp_num: int
    byte_len: int = 0
    imm_data: int | None = None


@dataclass(frozen=True)
class RemoteRegion:
    """What a peer advertises about one of its memory regions (as rdma_cm private data would)."""

    addr: int
    length: int
    rkey: int


class MemoryRegion(abc.ABC):
    """A registered region. ``buf`` is the local view of its bytes; remote peers address it by
    ``addr`` (the start of the region) plus an offset and authorise with ``rkey``."""

    addr: int
    length: int
    lkey: int
    rkey: int
    access: Access

    @property
    @abc.abstractmethod
    def buf(self) -> memoryview: ...

    def remote(self) -> RemoteRegion:
        return RemoteRegion(self.addr, self.length, self.rkey)

    @abc.abstractmethod
    def close(self) -> None:
        """Deregister: later remote access with this rkey fails with REM_ACCESS_ERR."""


class CompletionQueue(abc.ABC):
    @abc.abstractmethod
    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        """Return up to ``max_entries`` completions without blocking."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None, max_entries: int = 16,
             spin: float | None = None) -> list[WorkCompletion]:
        """Block until at least one completion is available or ``timeout`` passes (then []).

        Polls for ``spin`` seconds (None: the provider's default), then sleeps on the completion
        channel: an idle queue burns no core. Polling saves a wake-up when the peer answers
        within it, and costs the CPU the peer may need when both share the cores.
        """

    @abc.abstractmethod
    def close(self) -> None: ...


class QueuePair(abc.ABC):
    """A reliable-connected queue pair. Work requests complete in posting order on its CQs."""

    qp_num: int

    @property
    @abc.abstractmethod
    def state(self) -> QPState: ...

    @abc.abstractmethod
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
        """One-sided RDMA WRITE (WITH_IMM when ``imm_data`` is given: consumes a posted receive
        at the peer and completes there as RECV_RDMA_WITH_IMM)."""

    @abc.abstractmethod
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
        """One-sided RDMA READ of the peer's region into ``local``."""

    @abc.abstractmethod
    def post_send(
        self,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        wr_id: int,
        imm_data: int | None = None,
        signaled: bool = True,
    ) -> None: ...

    @abc.abstractmethod
    def post_recv(self, local: MemoryRegion, local_offset: int, length: int, wr_id: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Destroy the queue pair; the peer's queue pair moves to ERR within the provider's bound."""


class ProtectionDomain(abc.ABC):
    @abc.abstractmethod
    def reg_mr(self, length: int, access: Access) -> MemoryRegion: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class Context(abc.ABC):
    """An opened device. ``provider`` is ``verbs``, ``shm`` or ``tcp``."""

    provider: str

    @abc.abstractmethod
    def alloc_pd(self) -> ProtectionDomain: ...

    @abc.abstractmethod
    def create_cq(self, depth: int = 1024) -> CompletionQueue: ...

    @abc.abstractmethod
    def close(self) -> None: ...
