"""kill -9 of the leader mid-workload: a follower takes over with nothing acknowledged lost."""

import signal

import redis as redis_py

from supervise.localcluster import LocalCluster

from .procs import alive
from .workload import fault_the_leader_under_writers, pause_the_leader, redis_snapshot


def test_leader_killed_mid_workload_follower_takes_over_and_old_node_rejoins():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start(timeout=120)

        def kill(old):
            cluster.kill(old)
            return cluster.wait_leader(timeout=30, exclude=old.name)

        old, new, acked, takeover = fault_the_leader_under_writers(cluster, kill)
        print(f"new leader {new.name} gating {takeover:.2f}s after the kill")
        client = redis_py.Redis(port=new.server_port)
        values = client.mget(acked)
        missing = [k for k, v in zip(acked, values, strict=True) if v is None]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"

        cluster.restart(old)  # empty server, same data directory
        cluster.wait_applied(timeout=120)
        docs = {n.name: n.status() for n in cluster.nodes}
        assert all(not d["diverged"] for d in docs.values()), docs
        snaps = {n.name: redis_snapshot(n.server_port) for n in cluster.nodes}
        assert snaps[old.name] == snaps[new.name]
        assert len(snaps[new.name]) >= len(acked)


def test_sigterm_leader_hands_over_and_a_follower_leaves_its_server_running():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        client = redis_py.Redis(port=leader.server_port)
        client.set("before", "handover")
        leader.supervisor.send_signal(signal.SIGTERM)
        assert leader.supervisor.wait(30) == 0, cluster.logs()
        new = cluster.wait_leader(timeout=30, exclude=leader.name)
        assert "stepping down: another node leads" in leader.log_path.read_text()
        new_client = redis_py.Redis(port=new.server_port)
        assert new_client.get("before") == b"handover"
        new_client.set("after", "handover")

        follower = next(n for n in cluster.nodes if n not in (leader, new))
        cluster.wait_applied()
        follower.supervisor.send_signal(signal.SIGTERM)
        assert follower.supervisor.wait(30) == 0
        assert alive(follower.server.pid)
        assert redis_py.Redis(port=follower.server_port).get("after") == b"handover"
        status = open(f"/proc/{follower.server.pid}/status").read()
        assert "TracerPid:\t0" in status


def test_a_leader_paused_past_its_leadership_keeps_its_copy_and_follows():
    """The paused leader's held inputs are decided by the log: it neither exits nor needs a
    fresh server, and its copy ends identical to the others."""
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        try:
            cluster.start(timeout=120)
            old, new, acked, _ = fault_the_leader_under_writers(cluster, pause_the_leader(cluster))
            cluster.wait_applied(timeout=60)
            assert old.supervisor.poll() is None, old.log_path.read_text()[-3000:]
            log_text = old.log_path.read_text()
            assert "lost leadership" in log_text and "went on past this node's leadership" in log_text
            docs = {n.name: n.status() for n in cluster.nodes}
            assert docs[old.name]["role"] == "follower" and not docs[old.name]["gating"], docs
            assert all(not d["diverged"] for d in docs.values()), docs
            values = redis_py.Redis(port=new.server_port).mget(acked)
            missing = [k for k, v in zip(acked, values, strict=True) if v is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
            snaps = {n.name: redis_snapshot(n.server_port) for n in cluster.nodes}
            assert snaps[old.name] == snaps[new.name]
        except BaseException:
            print(cluster.logs())
            raise


def test_a_followers_server_killed_mid_workload_takes_only_its_supervisor_out_with_one_line():
    """The supervisor learns that its server died and leaves: one line for it, not one for each
    entry it then had no server to replay into. The others go on."""
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start()
        killed = []

        def kill_a_followers_server(leader):
            follower = next(n for n in cluster.nodes if n is not leader)
            follower.server.send_signal(signal.SIGKILL)
            follower.supervisor.wait(30)
            killed.append(follower)
            return leader

        fault_the_leader_under_writers(cluster, kill_a_followers_server)
        (node,) = killed
        assert node.supervisor.returncode == 1
        log = node.log_path.read_text()
        assert log.count("exited with status") == 1 and "dropped" not in log, log
