"""`supervise --pid PID --config FILE --node NAME` (or `-- CMD`): run one node until stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys

from consensus import LogDirInUse, LogWriteError, SegmentCorruptError

from .config import ClusterConfig, ConfigError
from .failpoints import FailpointFile
from .handover import PATH, HandoverEndpoint
from .metrics import NodeMetrics
from .node import LOG_FAILED_EXIT, LOST_LEADERSHIP_EXIT, Node
from .server_record import ServerRecord
from .stop_signals import catch_stop_signals

log = logging.getLogger("supervise")


def _no_wakeup_preemption() -> None:
    """Run this process's threads, and those they start, as SCHED_BATCH: a woken thread then
    waits for the running one to block or use up its slice instead of preempting it. Each
    replicated input is handed from thread to thread and process to process (tracer, consensus,
    followers), and a woken thread that preempted the one that woke it kept that one from
    finishing its hand-off. Three-node cluster, redis-benchmark -t set -c 50: 2,322 against
    2,153 SET/s (four interleaved pairs, each pair better). Fair shares are unchanged."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # a thread that ended meanwhile; or a policy we may not leave
            log.debug("thread %s keeps its scheduling policy: %s", tid, exc)


def _raise_fd_limit() -> None:
    """A follower holds two descriptors per replayed client connection (its own end, and the
    server's end borrowed to see what the server has read): more than the usual soft limit of
    1,024 allows once the server has a few hundred clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_node(cluster: ClusterConfig, name: str, pid: int | None, command: list[str]) -> int:
    # First: a SIGTERM while the node attaches would otherwise kill it there, and with it a server
    # it already gates (EXITKILL). One received now stops the node once it has started.
    signals = catch_stop_signals()
    me = cluster.node(name)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    record = ServerRecord(name, me.data_dir)
    if pid is not None:
        record.check(pid)
    node = Node(cluster, me, NodeMetrics(name))
    from .http_status import serve

    secret = cluster.secret()
    actions = {PATH: HandoverEndpoint(name, secret, node.hand_over)}
    try:
        http = serve(me.status, node.status, actions)
    except OSError as exc:
        raise ConfigError(f"{cluster.path}: node {name!r}.status: cannot listen on {me.status}: "
                          f"{exc.strerror}") from None
    node.vip.drop_stale()  # first: until it is gone, clients may reach a copy that is not leading
    node.attach(pid, command)
    _no_wakeup_preemption()  # after attach: a server it launched keeps the usual policy
    _raise_fd_limit()  # likewise
    try:
        node.start_replica()
    except (LogWriteError, SegmentCorruptError, LogDirInUse) as exc:
        log.error("%s: node %s cannot start from its data_dir (%s)", exc, name, me.data_dir)
        node.shutdown()
        http.shutdown()
        return 2 if isinstance(exc, LogDirInUse) else LOG_FAILED_EXIT
    try:
        record.write(node.server_pid)
    except OSError as exc:
        log.warning("%s: cannot record which process is this node's server (%s): a later "
                    "attach to pid %d will not be refused", record.path, exc, node.server_pid)
    log.info("node %s: server pid %d on %s, replication %s, status http://%s/status",
             name, node.server_pid, me.server, me.replication, me.status)
    failpoints = FailpointFile.from_environment()
    if failpoints is not None and node.replica is not None and node.replica.transport.ctx.provider != "tcp":
        log.warning("failpoints in %s are ignored: only the tcp transport has them", failpoints.path)
        failpoints = None
    while not signals and not node.fatal.wait(0.2):
        if failpoints is not None and node.replica is not None:
            failpoints.poll(node.replica.transport)
    if node.exit_code == LOST_LEADERSHIP_EXIT:
        # Without detaching: EXITKILL takes the server down, but only once the exit has closed
        # the probes (seconds on a busy machine); its main process goes at once.
        if node.server_pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.server_pid, signal.SIGKILL)
        os._exit(LOST_LEADERSHIP_EXIT)
    node.shutdown()
    http.shutdown()
    log.info("node %s stopped", name)
    return node.exit_code
