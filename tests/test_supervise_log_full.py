"""A node whose data_dir's disk runs full leaves the service as if it had crashed (exit status
4, one line saying where and what to do); the others go on with nothing acknowledged lost, and
the node, restarted once there is room, rejoins from its own log and converges."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import redis as redis_py

from supervise.leadership import LOG_FAILED_EXIT
from supervise.localcluster import LocalCluster, LocalNode

from .procs import alive, wait_until
from .small_disk import fill, small_disk
from .workload import fault_the_leader_under_writers, redis_snapshot


@contextlib.contextmanager
def cluster_on_small_disks() -> Iterator[LocalCluster]:
    """Three Redis copies, each node's data_dir a tmpfs of its own."""
    cluster = LocalCluster(n=3, server="redis", transport="shm")
    try:
        with contextlib.ExitStack() as disks:
            for node in cluster.nodes:
                disks.enter_context(small_disk(cluster.workdir / f"{node.name}-data", megabytes=64))
            try:
                yield cluster
            finally:
                for node in cluster.nodes:
                    cluster.kill(node)
    finally:
        cluster.stop()


def _fill_and_wait_for_exit(cluster: LocalCluster, node: LocalNode) -> None:
    fill(cluster.workdir / f"{node.name}-data")
    assert node.supervisor is not None
    assert node.supervisor.wait(30) == LOG_FAILED_EXIT, cluster.logs()
    text = node.log_path.read_text()
    assert text.count("cannot write the log in") == 1, text[-3000:]
    assert "No space left on device" in text and "Traceback" not in text, text[-3000:]


def _rejoin_and_compare(cluster: LocalCluster, node: LocalNode) -> None:
    (cluster.workdir / f"{node.name}-data" / "ballast").unlink()
    cluster.restart(node)  # a fresh server; the node's log is kept
    cluster.wait_applied(timeout=120)
    docs = {n.name: n.status() for n in cluster.nodes}
    assert all(d and not d["diverged"] for d in docs.values()), docs
    snaps = [redis_snapshot(n.server_port) for n in cluster.nodes]
    assert snaps[0] == snaps[1] == snaps[2] and len(snaps[0]) >= 600


def test_a_leader_whose_disk_fills_leaves_and_a_follower_takes_over_with_nothing_lost():
    with cluster_on_small_disks() as cluster:
        cluster.start(timeout=120)

        def fill_its_disk(old: LocalNode) -> LocalNode:
            server = old.server
            _fill_and_wait_for_exit(cluster, old)
            assert server is not None and server.wait(10) is not None  # it left with its leader
            return cluster.wait_leader(timeout=30, exclude=old.name)

        old, new, acked, took = fault_the_leader_under_writers(cluster, fill_its_disk)
        print(f"new leader {new.name} gating {took:.2f}s after the disk filled")
        values = redis_py.Redis(port=new.server_port).mget(acked)
        missing = [k for k, v in zip(acked, values, strict=True) if v is None]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        _rejoin_and_compare(cluster, old)


def test_a_follower_whose_disk_fills_leaves_its_server_and_the_others_go_on():
    with cluster_on_small_disks() as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        follower = next(n for n in cluster.nodes if n is not leader)
        client = redis_py.Redis(port=leader.server_port, socket_timeout=10)
        for i in range(300):
            client.set(f"before:{i}", i)
        fill(cluster.workdir / f"{follower.name}-data")
        deadline = time.monotonic() + 30
        i = 0
        while follower.supervisor.poll() is None and time.monotonic() < deadline:
            client.set(f"during:{i}", i)
            i += 1
        _fill_and_wait_for_exit(cluster, follower)
        assert alive(follower.server.pid)  # a follower leaves its server running
        for i in range(300):
            client.set(f"after:{i}", i)  # two of three nodes carry on
        assert cluster.wait_leader() is leader
        _rejoin_and_compare(cluster, follower)


def test_a_node_whose_log_is_corrupt_says_which_file_and_leaves_its_server_untouched():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        node = cluster.nodes[0]
        segment = cluster.workdir / f"{node.name}-data" / "log" / f"seg-{1:020d}.log"
        segment.parent.mkdir(parents=True)
        segment.write_bytes(b"\xff" * 200 + b"\0" * 8)  # damaged where a record's header is
        cluster.start_server(node)
        cluster.start_supervisor(node)
        assert node.supervisor.wait(60) == LOG_FAILED_EXIT
        last = node.log_path.read_text().strip().splitlines()[-1]
        assert f"corrupt log segment {segment} at offset 0" in last, last
        assert f"node {node.name} cannot start from its data_dir" in last, last
        assert alive(node.server.pid)
        status = open(f"/proc/{node.server.pid}/status").read()
        assert "TracerPid:\t0" in status


def test_a_node_given_another_running_nodes_data_dir_is_refused_and_leaves_its_server_untouched():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.config.write_text(cluster.config.read_text().replace('data_dir = "n2-data"',
                                                                     'data_dir = "n1-data"'))
        first, second = cluster.nodes[:2]
        cluster.start_server(first)
        cluster.start_supervisor(first)
        wait_until(lambda: "status http://" in first.log_path.read_text(), 60, "n1 to start")
        cluster.start_server(second)
        cluster.start_supervisor(second)
        assert second.supervisor.wait(60) == 2
        last = second.log_path.read_text().strip().splitlines()[-1]
        data_dir = cluster.workdir / "n1-data"
        assert (f"the log in {data_dir} is in use by another process (pid {first.supervisor.pid}): "
                f"each replica needs a data directory of its own") in last, last
        assert first.supervisor.poll() is None
        assert alive(second.server.pid)
        assert "TracerPid:\t0" in open(f"/proc/{second.server.pid}/status").read()
