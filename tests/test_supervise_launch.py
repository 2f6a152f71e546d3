"""The launch form, `supervise --config FILE --node NAME -- CMD`: the supervisor starts the server
under its tracer, so the copy is held from its first instruction on."""

import os
import signal
import subprocess
import sys
import time

import redis as redis_py

from supervise.localcluster import SERVERS, LocalCluster, wait_port

from .procs import wait_until


def _launch(cluster: LocalCluster, node) -> subprocess.Popen:
    workdir = cluster.workdir / f"{node.name}-server"
    workdir.mkdir(exist_ok=True)
    node.log_path = cluster.workdir / f"{node.name}.log"
    with open(node.log_path, "ab") as log:
        node.supervisor = subprocess.Popen(
            [sys.executable, "-m", "supervise", "--config", str(cluster.config), "--node", node.name,
             "--", *SERVERS["redis"](node.server_port, str(workdir))],
            stdout=log, stderr=log)
    wait_port(node.server_port, timeout=60)
    return node.supervisor


def _server_pid(node, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = (node.status() or {}).get("server_pid") or 0
        if pid:
            return pid
        time.sleep(0.05)
    raise TimeoutError(f"{node.name} reported no server pid")


def _policies(pid: int) -> set[int]:
    """The scheduling policies of a process's threads, skipping any that ends meanwhile (the
    status server answers each request on a thread of its own)."""
    policies = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:
            pass
    return policies


def test_a_launched_copy_replicates_keeps_the_usual_scheduling_and_dies_with_its_killed_supervisor():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        attached, launched = cluster.nodes[:2], cluster.nodes[2]
        for node in attached:
            cluster.start_server(node)
            cluster.start_supervisor(node)
        _launch(cluster, launched)
        leader = cluster.wait_leader(timeout=120)
        pid = _server_pid(launched)
        assert pid != launched.supervisor.pid
        # the supervisor's threads give up wake-up preemption; the server it started does not
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        for node in (launched, attached[0]):  # two nodes can elect a leader while one still attaches
            wait_until(lambda n=node: (n.status() or {}).get("role", "starting") != "starting",
                       60, f"{node.name} to finish attaching")
        for sup in (launched.supervisor.pid, attached[0].supervisor.pid):
            assert _policies(sup) == {os.SCHED_BATCH}
        client = redis_py.Redis(port=leader.server_port)
        for i in range(100):
            client.set(f"k{i}", i)
        client.close()
        cluster.wait_applied(timeout=60)
        direct = redis_py.Redis(port=launched.server_port)
        assert direct.dbsize() == 100 and direct.get("k99") == b"99"
        direct.close()
        launched.supervisor.send_signal(signal.SIGKILL)
        launched.supervisor.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the launched server outlived its supervisor"


def test_a_follower_stopped_by_a_burst_of_signals_exits_cleanly_and_leaves_its_server():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader(timeout=120)
        follower = next(n for n in cluster.nodes if n is not leader)
        # two nodes can elect a leader while the third is still starting: before its status
        # answers, a supervisor may not have its handlers yet
        wait_until(lambda: follower.status(timeout=1.0) is not None, 120, f"{follower.name} to answer")
        for i in range(50):
            follower.supervisor.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        assert follower.supervisor.wait(30) == 0, cluster.logs()
        assert follower.server.poll() is None, "a follower leaves its server running"
        direct = redis_py.Redis(port=follower.server_port)
        assert direct.ping()
        direct.close()
