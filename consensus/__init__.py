"""Multi-Paxos log replicated by one-sided writes over rdma/ (see README.md in this package).

Payloads are opaque bytes; this package knows nothing of syscalls. ``read_secret`` and
``SecretFileError`` (the cluster secret file, mode 0600) are re-exported from rdma.cm so that
users of consensus need not import rdma/.
"""

from consensus.commit_future import CommitFuture
from consensus.errors import LeadershipLost, LogDirInUse, LogWriteError, NotLeader, ReplicaClosed
from consensus.replica import Peer, Replica, ReplicaConfig
from consensus.segments import SegmentCorruptError
from rdma.cm import SecretFileError, read_secret

__all__ = ["CommitFuture", "LeadershipLost", "LogDirInUse", "LogWriteError", "NotLeader", "Peer", "Replica",
           "ReplicaClosed", "ReplicaConfig", "SecretFileError", "SegmentCorruptError", "read_secret"]
