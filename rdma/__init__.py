"""A verbs-shaped RDMA transport with ``verbs`` (pyverbs), ``shm`` and ``tcp`` providers.

Typical use::

    ctx = open_context("auto", peer_hosts)
    pd = ctx.alloc_pd(); cq = ctx.create_cq()
    mr = pd.reg_mr(1 << 20, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
    lst = Listener(ctx, pd, "0.0.0.0:7000", read_secret(path), cq, cq, private_data=b"...")
    conn = connect(ctx, pd, "peer:7000", secret, cq, cq, private_data=b"...")
    conn.qp.post_write(mr, 0, 64, remote.addr, remote.rkey, wr_id=1); cq.wait(1.0)
"""

from .cm import (
    ConnectError,
    Connection,
    Listener,
    SecretFileError,
    connect,
    is_local_host,
    open_context,
    rdma_devices,
    read_secret,
)
from .verbs import (
    Access,
    CompletionQueue,
    Context,
    MemoryRegion,
    ProtectionDomain,
    QPState,
    QueuePair,
    RemoteRegion,
    VerbsError,
    WCOpcode,
    WCStatus,
    WorkCompletion,
)

__all__ = [
    "Access",
    "CompletionQueue",
    "ConnectError",
    "Connection",
    "Context",
    "Listener",
    "MemoryRegion",
    "ProtectionDomain",
    "QPState",
    "QueuePair",
    "RemoteRegion",
    "SecretFileError",
    "VerbsError",
    "WCOpcode",
    "WCStatus",
    "WorkCompletion",
    "connect",
    "is_local_host",
    "open_context",
    "rdma_devices",
    "read_secret",
]
