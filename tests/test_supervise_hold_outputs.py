"""A group whose leader holds its server's outputs instead of its inputs (cluster.hold =
"outputs"): the same copies, and nothing a client saw acknowledged is lost."""


import redis as redis_py

from supervise.leadership import LOST_LEADERSHIP_EXIT
from supervise.localcluster import LocalCluster

from .workload import (
    assert_mixed_writes_leave_identical_copies,
    fault_the_leader_under_writers,
    pause_the_leader,
)


def _acked_on(node, acked: list[str]) -> None:
    values = redis_py.Redis(port=node.server_port).mget(acked)
    missing = [k for k, v in zip(acked, values, strict=True) if v is None]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_twenty_clients_mixed_writes_leave_identical_copies_with_outputs_held():
    with LocalCluster(n=3, server="redis", transport="shm", hold="outputs") as cluster:
        cluster.start(timeout=120)
        assert_mixed_writes_leave_identical_copies(cluster)
        leader = cluster.wait_leader()
        assert "holding outputs" in leader.log_path.read_text()


def test_leader_killed_mid_workload_with_outputs_held_loses_no_acknowledged_write():
    with LocalCluster(n=3, server="redis", transport="shm", hold="outputs") as cluster:
        cluster.start(timeout=120)

        def kill(old):
            cluster.kill(old)
            return cluster.wait_leader(timeout=30, exclude=old.name)

        old, new, acked, _ = fault_the_leader_under_writers(cluster, kill)
        _acked_on(new, acked)
        cluster.restart(old)
        cluster.wait_applied(timeout=120)
        assert all(not n.status()["diverged"] for n in cluster.nodes)


def test_a_leader_paused_past_its_leadership_follows_or_leaves_and_rejoins_fresh():
    """Its server read inputs that may never commit: the old leader follows if the log took them
    all, and otherwise leaves with one line; restarted with a fresh server it converges."""
    with LocalCluster(n=3, server="redis", transport="shm", hold="outputs") as cluster:
        try:
            cluster.start(timeout=120)
            old, new, acked, _ = fault_the_leader_under_writers(cluster, pause_the_leader(cluster))
            _acked_on(new, acked)
            cluster.wait_applied(timeout=60)
            if old.supervisor.poll() is not None:
                assert old.supervisor.returncode == LOST_LEADERSHIP_EXIT
                assert "restart the node with a fresh server" in old.log_path.read_text()
                cluster.restart(old)
                cluster.wait_applied(timeout=120)
            docs = {n.name: n.status() for n in cluster.nodes}
            assert all(not d["diverged"] for d in docs.values()), docs
            snaps = {n.name: redis_py.Redis(port=n.server_port).execute_command("DEBUG", "DIGEST")
                     for n in cluster.nodes}
            assert len(set(snaps.values())) == 1, snaps
        except BaseException:
            print(cluster.logs())
            raise
