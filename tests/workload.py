"""Concurrent client workloads against a replicated server, and checks that copies agree."""

from __future__ import annotations

import random
import signal
import threading
import time

import redis as redis_py

from .stores import STORES

KEYS = 1000


def redis_op(client: redis_py.Redis, rng: random.Random) -> None:
    kind = rng.randrange(7)
    n = rng.randrange(KEYS // 5)
    if kind == 0:
        client.set(f"str:{n}", rng.randbytes(rng.randrange(1, 64)).hex())
    elif kind == 1:
        client.incr(f"ctr:{n}", rng.randrange(1, 10))
    elif kind == 2:
        client.lpush(f"list:{n}", rng.randrange(1000))
    elif kind == 3:
        client.sadd(f"set:{n}", rng.randrange(50))
    elif kind == 4:
        client.hset(f"hash:{n}", f"f{rng.randrange(10)}", rng.randrange(1000))
    elif kind == 5:
        client.delete(f"{rng.choice(['str', 'ctr', 'list', 'set', 'hash'])}:{n}")
    else:
        client.expire(f"{rng.choice(['str', 'ctr', 'list'])}:{n}", 3600)


def run_clients(port: int, clients: int, ops_per_client: int, seed: int = 1, pipeline: int = 1,
                protocol: int | None = None) -> None:
    """``pipeline``: commands each client sends before it reads their replies."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        client = redis_py.Redis(port=port, socket_timeout=30, protocol=protocol)
        try:
            for done in range(0, ops_per_client, pipeline):
                batch = client.pipeline(transaction=False) if pipeline > 1 else client
                for _ in range(min(pipeline, ops_per_client - done)):
                    redis_op(batch, rng)
                if pipeline > 1:
                    batch.execute()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def redis_snapshot(port: int) -> dict:
    """Every key with its type, value (lists in order) and whether it has a TTL."""
    client = redis_py.Redis(port=port, socket_timeout=30)
    out = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "hash":
            value = sorted(client.hgetall(key).items())
        else:
            value = None
        out[key] = (kind, value, client.ttl(key) > 0)
    client.close()
    return out


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0

    def add(self) -> None:
        with self.lock:
            self.n += 1


def assert_copies_answer_alike(cluster, leader, *command: str) -> None:
    """The leader's answer to ``command`` (asked through its gate, in RESP2) is each follower's
    once it has applied the log, and no node reports divergence."""
    through_gate = redis_py.Redis(port=leader.server_port, protocol=2)
    answer = through_gate.execute_command(*command)
    through_gate.close()
    cluster.wait_applied(timeout=120)
    for node in cluster.nodes:
        assert node.status()["diverged"] is False, node.status()["diverged_reason"]
        if node is not leader:
            direct = redis_py.Redis(port=node.server_port)
            assert direct.execute_command(*command) == answer, node.name
            direct.close()


def assert_mixed_writes_leave_identical_copies(cluster) -> None:
    """20 clients of 1,000 mixed writes through the leader leave every copy the same."""
    leader = cluster.wait_leader()
    run_clients(leader.server_port, clients=20, ops_per_client=1000)
    cluster.wait_applied(timeout=120)
    for node in cluster.nodes:
        doc = node.status()
        assert doc["diverged"] is False, doc["diverged_reason"]
        assert doc["escapes"] == 0
        assert "set serialize = true" not in node.log_path.read_text()  # Redis reads on one thread
    # DEBUG DIGEST covers every key, type, value and list order, and its output is deterministic.
    # The leader's is read through the gate first; the followers' directly once that is applied
    # (a direct client changes a follower: its connection numbers show in later HELLO replies).
    leader_client = redis_py.Redis(port=leader.server_port)
    digests = {leader.name: leader_client.execute_command("DEBUG", "DIGEST")}
    leader_client.close()
    cluster.wait_applied()
    time.sleep(1.0)
    for node in cluster.nodes:
        if node is not leader:
            direct = redis_py.Redis(port=node.server_port)
            digests[node.name] = direct.execute_command("DEBUG", "DIGEST")
            direct.close()
    assert len(set(digests.values())) == 1, digests
    from .observability import scrape  # observability.py imports this module

    for node in cluster.nodes:  # the followers compared their replies with the leader's
        if node is not leader:
            checks = [line for line in scrape(node.status_port).splitlines()
                      if line.startswith("supervise_digest_checks_total{")]
            assert checks and float(checks[0].split()[-1]) > 0, (node.name, checks)
    # key by key on the followers, read directly (SCAN order and TTLs are no replicated output)
    followers = [n for n in cluster.nodes if n is not leader]
    snapshots = [redis_snapshot(n.server_port) for n in followers]
    assert len(snapshots[0]) > 500
    assert snapshots[0] == snapshots[1]
    assert int(digests[leader.name] != b"") and len(snapshots[1]) == len(snapshots[0])


def _writer(cluster, index, acked, stop, errors, server):
    """Writes unique keys; on any connection error finds the current leader and goes on."""
    seq = 0
    store = conn = None
    while not stop.is_set():
        if conn is None:
            try:
                store = STORES[server](cluster.wait_leader(timeout=30).server_port, timeout=5)
            except (TimeoutError, RuntimeError) as exc:
                errors.append(exc)
                return
        try:
            if conn is None:
                conn = store.connect("127.0.0.1")
            key = f"w{index}:{seq}"
            store.set(conn, key, str(seq))
            acked.append(key)
            seq += 1
        except store.lost:
            if conn is not None:
                store.close(conn)
            conn = None
            seq += 1  # the outcome of that write is unknown: never reuse its key
            time.sleep(0.05)
        except store.refused as exc:
            errors.append(exc)
            return
    if conn is not None:
        store.close(conn)


def fault_the_leader_under_writers(cluster, fault, server: str = "redis") -> tuple:
    """8 writers through the leader; after 300 acknowledged writes ``fault(old)`` returns the new
    leader; the writers go on for 300 more. Returns (old, new, acked, seconds to the new leader)."""
    old = cluster.wait_leader()
    acked: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(cluster, i, acked, stop, errors, server))
               for i in range(8)]
    for w in writers:
        w.start()
    try:
        while len(acked) < 300:
            time.sleep(0.05)
        faulted_at = time.monotonic()
        new = fault(old)
        took = time.monotonic() - faulted_at
        before = len(acked)
        deadline = time.monotonic() + 60
        while len(acked) < before + 300 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    assert not errors, errors[0]
    assert len(acked) >= before + 300, "clients went on with the new leader"
    return old, new, acked, took


def pause_the_leader(cluster):
    """A fault for fault_the_leader_under_writers: SIGSTOP the leader's supervisor until another
    node leads, then SIGCONT it; returns the new leader."""

    def pause(old):
        old.supervisor.send_signal(signal.SIGSTOP)
        try:
            return cluster.wait_leader(timeout=30, exclude=old.name)
        finally:
            old.supervisor.send_signal(signal.SIGCONT)

    return pause
