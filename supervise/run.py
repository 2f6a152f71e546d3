"""`supervise --pid PID --config FILE --node NAME` (or `-- CMD`): run one node until stopped."""

from __future__ import annotations

import logging
import os
import sys

from .config import ClusterConfig, ConfigError
from .failpoints import FailpointFile
from .metrics import NodeMetrics
from .node import LOST_LEADERSHIP_EXIT, Node
from .stop_signals import catch_stop_signals

log = logging.getLogger("supervise")


def run_node(cluster: ClusterConfig, name: str, pid: int | None, command: list[str]) -> int:
    me = cluster.node(name)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    node = Node(cluster, me, NodeMetrics(name))
    from .http_status import serve

    try:
        http = serve(me.status, node.status)
    except OSError as exc:
        raise ConfigError(f"{cluster.path}: node {name!r}.status: cannot listen on {me.status}: "
                          f"{exc.strerror}") from None
    node.vip.drop_stale()  # first: until it is gone, clients may reach a copy that is not leading
    node.attach(pid, command)
    node.start_replica()
    log.info("node %s: server pid %d on %s, replication %s, status http://%s/status",
             name, node.server_pid, me.server, me.replication, me.status)
    failpoints = FailpointFile.from_environment()
    if failpoints is not None and node.replica is not None and node.replica.transport.ctx.provider != "tcp":
        log.warning("failpoints in %s are ignored: only the tcp transport has them", failpoints.path)
        failpoints = None
    signals = catch_stop_signals()
    while not signals and not node.fatal.wait(0.2):
        if failpoints is not None and node.replica is not None:
            failpoints.poll(node.replica.transport)
    if node.exit_code == LOST_LEADERSHIP_EXIT:
        os._exit(LOST_LEADERSHIP_EXIT)  # without detaching: EXITKILL takes the server down
    node.shutdown()
    http.shutdown()
    log.info("node %s stopped", name)
    return node.exit_code
