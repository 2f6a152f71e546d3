"""Three supervised Redis copies on one host (shm) behave as one server."""

import socket
import time

import pytest
import redis as redis_py

from supervise.localcluster import LocalCluster

from .workload import redis_snapshot, run_clients


@pytest.fixture
def cluster(request):
    c = LocalCluster(n=3, server="redis", transport="shm")
    try:
        c.start(timeout=60)
        yield c
    finally:
        if request.node.rep_call_failed if hasattr(request.node, "rep_call_failed") else False:
            print(c.logs())
        c.stop()


def test_twenty_clients_mixed_writes_leave_identical_copies(cluster):
    leader = cluster.wait_leader()
    run_clients(leader.server_port, clients=20, ops_per_client=1000)
    cluster.wait_applied(timeout=120)
    for node in cluster.nodes:
        doc = node.status()
        assert doc["diverged"] is False, doc["diverged_reason"]
        assert doc["escapes"] == 0
    # reading the copies directly (SCAN order and TTLs are not deterministic output)
    snapshots = {n.name: redis_snapshot(n.server_port) for n in cluster.nodes}
    reference = snapshots[leader.name]
    assert len(reference) > 500
    for name, snap in snapshots.items():
        assert snap == reference, f"{name} differs from the leader {leader.name}"


def test_a_follower_fed_an_extra_write_out_of_band_is_marked_diverged(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    client = redis_py.Redis(port=leader.server_port)
    client.set("counter", 1)
    cluster.wait_applied()
    redis_py.Redis(port=follower.server_port).set("counter", 100)  # behind everyone's back
    for _ in range(5):
        client.incr("counter")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not follower.status()["diverged"]:
        client.incr("counter")
        time.sleep(0.2)
    doc = follower.status()
    assert doc["diverged"] is True
    assert "crc32" in doc["diverged_reason"]
    assert doc["stray_connections"] >= 1
    others = [n for n in cluster.nodes if n is not follower]
    assert not any(n.status()["diverged"] for n in others)
    assert "DIVERGED" in follower.log_path.read_text()


def test_leader_refuses_nothing_and_followers_count_stray_clients(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    with socket.create_connection(("127.0.0.1", follower.server_port)) as stray:
        stray.sendall(b"*1\r\n$4\r\nPING\r\n")
        stray.recv(100)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and follower.status()["stray_connections"] == 0:
        time.sleep(0.1)
    assert follower.status()["stray_connections"] == 1
    assert leader.status()["stray_connections"] == 0
