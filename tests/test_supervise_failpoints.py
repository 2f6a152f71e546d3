"""Over the tcp transport, a supervised Redis group loses nothing to a bad network: requests
dropped (and retransmitted), held back and duplicated by the provider's failpoints, switched on
and off in running supervisors through SUPERVISE_FAILPOINTS."""

import json
import time

import redis as redis_py

from supervise.failpoints import ENV
from supervise.localcluster import LocalCluster

from .workload import run_clients

BAD_NETWORK = {"drop": 0.1, "delay": 0.004, "duplicate": 0.1, "seed": 11}


def _wait_logged(cluster: LocalCluster, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in node.log_path.read_text() for node in cluster.nodes):
            return
        time.sleep(0.1)
    raise AssertionError(f"not every node logged {text!r}")


def test_writes_through_dropped_delayed_and_duplicated_messages_reach_every_copy(tmp_path):
    spec = tmp_path / "failpoints.json"
    with LocalCluster(n=3, server="redis", transport="tcp", env={ENV: str(spec)}) as cluster:
        cluster.start(timeout=120)
        spec.write_text(json.dumps(BAD_NETWORK))
        _wait_logged(cluster, "transport failpoints now")
        leader = cluster.wait_leader()
        run_clients(leader.server_port, clients=8, ops_per_client=150)
        client = redis_py.Redis(port=leader.server_port)
        for _ in range(200):
            client.incr("counter")
        client.close()
        spec.write_text("{}")
        _wait_logged(cluster, "transport failpoints cleared")
        cluster.wait_applied(timeout=120)
        for node in cluster.nodes:
            doc = node.status()
            assert doc["diverged"] is False, doc["diverged_reason"]
        counters = {}
        for node in sorted(cluster.nodes, key=lambda n: n is not leader):
            direct = redis_py.Redis(port=node.server_port)
            counters[node.name] = (direct.get("counter"), direct.dbsize())
            direct.close()
        assert set(counters.values()) == {(b"200", counters[leader.name][1])}, counters


def test_a_bad_failpoint_file_is_reported_and_leaves_the_node_running(tmp_path):
    spec = tmp_path / "failpoints.json"
    spec.write_text('{"drop": 0.5, "loss": 1}')
    with LocalCluster(n=3, server="redis", transport="tcp", env={ENV: str(spec)}) as cluster:
        cluster.start(timeout=120)
        _wait_logged(cluster, "failpoints left as they were")
        leader = cluster.wait_leader()
        client = redis_py.Redis(port=leader.server_port)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
