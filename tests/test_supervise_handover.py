"""`supervise handover`: leadership moves under writers, nothing stops, nothing acknowledged is
lost, the old leader keeps its server and follows; a request not signed with the group's secret,
for a ballot the node no longer leads at, sent a second time, or naming a peer that could not
lead at once, is refused."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import redis as redis_py
from hypothesis import given
from hypothesis import strategies as st

from supervise.handover import PATH, HandoverEndpoint, request_body
from supervise.localcluster import LocalCluster

from .workload import assert_copies_answer_alike, fault_the_leader_under_writers


def _supervise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervise", *args], capture_output=True,
                          text=True, timeout=90)


def test_handover_moves_leadership_under_writers_and_the_old_leader_keeps_its_server():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        try:
            cluster.start(timeout=120)
            servers = {n.name: n.server.pid for n in cluster.nodes}
            chosen = {}

            def hand_over(old):
                chosen["to"] = next(n for n in cluster.nodes if n is not old)
                result = _supervise("handover", "--config", str(cluster.config),
                                    "--to", chosen["to"].name)
                assert result.returncode == 0, result.stderr
                assert result.stdout.startswith(f"leader: {old.name} -> {chosen['to'].name} (ballot ")
                return cluster.wait_leader(timeout=30, exclude=old.name)

            old, new, acked, took = fault_the_leader_under_writers(cluster, hand_over)
            print(f"{new.name} gating {took:.2f}s after the hand-over was asked for")
            assert new is chosen["to"]
            cluster.wait_applied(timeout=60)
            assert all(n.supervisor.poll() is None for n in cluster.nodes), cluster.logs()
            assert {n.name: n.server.pid for n in cluster.nodes} == servers
            assert all(n.server.poll() is None for n in cluster.nodes)
            docs = {n.name: n.status() for n in cluster.nodes}
            assert docs[old.name]["role"] == "follower" and not docs[old.name]["gating"], docs
            assert "went on past this node's leadership" in old.log_path.read_text()

            # without --to, to the peer best placed, passing over one a stray client reached
            # (it sends nothing: Redis numbers the connection, and no reply shows the number);
            # to the leader itself, nothing to do
            followers = [n for n in cluster.nodes if n is not new]
            reached = next((n for n in followers if n.status()["defers_candidacy"]), followers[0])
            socket.create_connection(("127.0.0.1", reached.server_port)).close()
            deadline = time.monotonic() + 10
            while not reached.status()["defers_candidacy"]:
                assert time.monotonic() < deadline, reached.status()
                time.sleep(0.05)
            untouched = next(n for n in followers if n is not reached)
            assert not untouched.status()["defers_candidacy"], untouched.status()
            result = _supervise("handover", "--config", str(cluster.config))
            assert result.returncode == 0, result.stderr
            assert cluster.wait_leader(timeout=30, exclude=new.name) is untouched
            leader = cluster.wait_leader()
            result = _supervise("handover", "--config", str(cluster.config), "--to", leader.name)
            assert (result.returncode, result.stdout.split(" (")[0]) == (0, f"{leader.name} leads already")
            result = _supervise("handover", "--config", str(cluster.config), "--to", "n9")
            assert result.returncode == 2
            assert "no [[node]] named 'n9'" in result.stderr.strip().splitlines()[-1]

            # read last: a reply whose bytes differ between copies (SCAN's order, a HELLO's client
            # id) read through the leader would be reported as divergence
            cluster.wait_applied(timeout=60)
            docs = {n.name: n.status() for n in cluster.nodes}
            assert all(not d["diverged"] for d in docs.values()), docs
            values = redis_py.Redis(port=leader.server_port, protocol=2).mget(acked)
            missing = [k for k, v in zip(acked, values, strict=True) if v is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
            assert_copies_answer_alike(cluster, leader, "DEBUG", "DIGEST")
        except BaseException:
            print(cluster.logs())
            raise


def test_a_leader_holding_outputs_hands_over_and_keeps_its_server():
    # its server runs inputs before they commit: before the hand-over it holds inputs instead
    # and waits for what ran to be logged, or it would have to leave with status 3
    with LocalCluster(n=3, server="redis", transport="shm", hold="outputs") as cluster:
        try:
            cluster.start(timeout=120)
            assert cluster.wait_leader().status()["holding"] == "outputs"

            def hand_over(old):
                result = _supervise("handover", "--config", str(cluster.config))
                assert result.returncode == 0, result.stderr
                return cluster.wait_leader(timeout=30, exclude=old.name)

            old, new, acked, _ = fault_the_leader_under_writers(cluster, hand_over)
            cluster.wait_applied(timeout=60)
            assert old.supervisor.poll() is None, old.log_path.read_text()[-3000:]
            assert old.status()["role"] == "follower"
            assert all(not n.status()["diverged"] for n in cluster.nodes)
            values = redis_py.Redis(port=new.server_port, protocol=2).mget(acked)
            assert all(v is not None for v in values)
            assert_copies_answer_alike(cluster, new, "DEBUG", "DIGEST")
        except BaseException:
            print(cluster.logs())
            raise


def test_a_leader_holding_outputs_whose_hand_over_fails_holds_its_clients_outputs_again():
    # while it tries, it holds inputs; after, its clients' connections are output-held again,
    # and the inputs they sent meanwhile (held until committed) make no output an escape
    with LocalCluster(n=3, server="redis", transport="shm", hold="outputs") as cluster:
        try:
            cluster.start(timeout=120)
            secret = cluster.workdir.joinpath("cluster.key").read_bytes()
            leader = cluster.wait_leader()
            ballot = leader.status()["ballot"]
            client = redis_py.Redis(port=leader.server_port, socket_timeout=30)
            for i in range(100):
                client.set(f"k{i}", i)
            target = next(n for n in cluster.nodes if n is not leader)
            for _ in range(10):  # asked within a heartbeat or so of the stop, it still looks ready
                body = request_body(secret, leader.name, target.name, ballot)
                writes = threading.Thread(target=lambda: [client.incr("during") for _ in range(50)])
                target.supervisor.send_signal(signal.SIGSTOP)
                try:
                    writes.start()
                    code, why = _post_handover(leader, body)
                    writes.join()
                finally:
                    target.supervisor.send_signal(signal.SIGCONT)
                if "could not take over" in why:
                    break
                assert "not ready to lead" in why, (code, why)
                time.sleep(1)
            assert code == 409 and "leads on" in why, (code, why)
            for i in range(100, 200):
                client.set(f"k{i}", i)
            assert client.mget([f"k{i}" for i in range(200)]) == [str(i).encode() for i in range(200)]
            doc = leader.status()
            assert (doc["role"], doc["ballot"], doc["holding"], doc["escapes"]) == \
                ("leader", ballot, "outputs", 0), doc
            cluster.wait_applied(timeout=60)
            assert all(not n.status()["diverged"] for n in cluster.nodes)
            assert_copies_answer_alike(cluster, leader, "DEBUG", "DIGEST")
            client.close()
        except BaseException:
            print(cluster.logs())
            raise


def _post_handover(node, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{node.status_port}{PATH}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())["leader"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


def test_a_handover_request_unsigned_stale_or_sent_again_is_refused():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start(timeout=120)
        secret = cluster.workdir.joinpath("cluster.key").read_bytes()
        leader = cluster.wait_leader()
        ballot = leader.status()["ballot"]
        for body in (request_body(b"not the secret", leader.name, None, ballot),
                     request_body(secret, leader.name, None, ballot, ts=time.time() - 3600),
                     json.dumps({"to": None, "ballot": ballot}).encode()):
            code, why = _post_handover(leader, body)
            assert code == 403, (code, why)
        code, why = _post_handover(leader, request_body(secret, leader.name, None, ballot - 1))
        assert code == 409 and f"leads at ballot {ballot} now" in why, (code, why)
        doc = leader.status()
        assert doc["role"] == "leader" and doc["ballot"] == ballot, doc

        # a peer that could not lead at once (here: stopped) is not handed leadership; the same
        # request sent again once it could is refused all the same
        stopped = next(n for n in cluster.nodes if n is not leader)
        to_stopped = request_body(secret, leader.name, stopped.name, ballot)
        stopped.supervisor.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)
            result = _supervise("handover", "--config", str(cluster.config), "--to", stopped.name)
            code, why = _post_handover(leader, to_stopped)
        finally:
            stopped.supervisor.send_signal(signal.SIGCONT)
        assert result.returncode == 1
        assert f"{stopped.name} is not ready to lead" in result.stderr.strip().splitlines()[-1]
        assert code == 409 and f"{stopped.name} is not ready to lead" in why, (code, why)
        cluster.wait_applied(timeout=60)
        code, why = _post_handover(leader, to_stopped)
        assert code == 403 and "taken already" in why, (code, why)
        doc = leader.status()
        assert doc["role"] == "leader" and doc["ballot"] == ballot, doc


def _never(to, ballot):
    raise AssertionError(f"a hand-over to {to} at ballot {ballot} was obeyed")


@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=20),
                              lambda kids: st.lists(kids, max_size=4)
                              | st.dictionaries(st.sampled_from(["to", "ballot", "ts", "mac", "x"]), kids,
                                                max_size=4),
                              max_leaves=8).map(lambda doc: json.dumps(doc).encode())),
       st.sampled_from(["10.0.0.9", "127.0.0.1", "::1"]))
def test_hostile_handover_requests_are_answered_and_never_obeyed(body, client):
    code, doc = HandoverEndpoint("n1", b"secret", _never)(body, client)
    assert code in (400, 403) and isinstance(doc["error"], str)
    code, doc = HandoverEndpoint("n1", b"", _never)(body, "10.0.0.9")  # no secret: only loopback
    assert code in (400, 403)
