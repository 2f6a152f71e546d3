"""Three supervised memcached copies (4 worker threads each) converge under concurrent clients.

Without ``serialize`` each client works on its own keys: two worker threads racing on one key are
ordered by the server's thread scheduling, which differs between copies (output checking reports
exactly that). With it, clients share their keys (tracer/serial.py).
"""

import random
import threading
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheUnexpectedCloseError

from supervise.localcluster import LocalCluster

from .workload import fault_the_leader_under_writers

KEYS_PER_CLIENT = 30
CLIENTS = 10
KEYS = [f"c{c}:k{i}" for c in range(CLIENTS) for i in range(KEYS_PER_CLIENT)]
SHARED_KEYS = 5


def _worker(port: int, seed: int, ops: int, errors: list) -> None:
    rng = random.Random(seed)
    client = Client(("127.0.0.1", port), timeout=30)
    try:
        for _ in range(ops):
            key = f"c{seed}:k{rng.randrange(KEYS_PER_CLIENT)}"
            kind = rng.randrange(5)
            if kind == 0:
                client.set(key, str(rng.randrange(1000)), noreply=False)
            elif kind == 1:
                client.add(key, "1", noreply=False)
            elif kind == 2:
                try:
                    client.incr(key, rng.randrange(1, 5), noreply=False)
                except MemcacheClientError:
                    pass  # the item was appended to: every copy answers the same error
            elif kind == 3:
                client.delete(key, noreply=False)
            else:
                client.append(key, "x", noreply=False)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    finally:
        client.close()


def _read_items(port: int, keys: list[str] = KEYS) -> dict:
    client = Client(("127.0.0.1", port))
    try:
        return client.get_many(keys)
    finally:
        client.close()


def _items_once_settled(port: int, reference: dict, keys: list[str] = KEYS,
                        timeout: float = 10.0) -> dict:
    """A follower's items, read until they match or the timeout passes.

    "Applied" means the follower's server has read an input, not that a worker thread has
    finished executing it: a read from another connection can land on another worker thread
    in between, so a follower is compared again for a short while before it counts as different.
    """
    deadline = time.monotonic() + timeout
    items = _read_items(port, keys)
    while items != reference and time.monotonic() < deadline:
        time.sleep(0.2)
        items = _read_items(port, keys)
    return items


def _shared_key_op(client: Client, rng: random.Random, seed: int) -> None:
    """An increment, append, set or delete on one of a handful of keys every client shares:
    its reply depends on the order in which the copy ran the other clients' requests."""
    key = f"shared{rng.randrange(SHARED_KEYS)}"
    kind = rng.randrange(4)
    if kind == 0:
        try:
            client.incr(key, 1, noreply=False)
        except MemcacheClientError:
            pass  # appended to: not a number, on every copy alike
    elif kind == 1:
        client.append(key, f"{seed}.", noreply=False)
    elif kind == 2:
        client.set(key, "0", noreply=False)
    else:
        client.delete(key, noreply=False)


def _shared_keys_worker(port: int, seed: int, ops: int, errors: list) -> None:
    rng = random.Random(seed)
    client = Client(("127.0.0.1", port), timeout=30)
    try:
        for _ in range(ops):
            _shared_key_op(client, rng, seed)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    finally:
        client.close()


def _shared_keys_until(cluster: LocalCluster, seed: int, stop: threading.Event) -> None:
    """Shared-key requests through whichever node leads, until ``stop``."""
    rng = random.Random(seed)
    client = None
    while not stop.is_set():
        try:
            if client is None:
                client = Client(("127.0.0.1", cluster.wait_leader(timeout=30).server_port),
                                timeout=5, connect_timeout=2)
            _shared_key_op(client, rng, seed)
        except (MemcacheUnexpectedCloseError, OSError):
            client.close()
            client = None
            time.sleep(0.05)
    if client is not None:
        client.close()


def _run_clients(worker, port: int, ops: int) -> None:
    """CLIENTS threads of ``worker(port, index, ops, errors)``; the first error fails the test."""
    errors: list = []
    threads = [threading.Thread(target=worker, args=(port, i, ops, errors)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _assert_the_others_match(cluster: LocalCluster, leader, reference: dict, keys: list[str]) -> None:
    for node in cluster.nodes:
        if node is not leader:
            assert _items_once_settled(node.server_port, reference, keys) == reference, \
                f"{node.name} differs from the leader"


def test_clients_racing_on_shared_keys_leave_identical_copies_when_serialized():
    """Also in a copy that replays the whole log after a restart."""
    with LocalCluster(n=3, server="memcached", transport="shm", serialize=True) as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        _run_clients(_shared_keys_worker, leader.server_port, 300)
        cluster.wait_applied(timeout=120)
        keys = [f"shared{i}" for i in range(SHARED_KEYS)]
        # may be empty: a key whose last set or delete was a delete is gone, all five about one
        # run in 32; every reply, whose value depends on the order, is compared by digest anyway
        reference = _read_items(leader.server_port, keys)
        _assert_the_others_match(cluster, leader, reference, keys)
        # a copy restarted with an empty server replays the whole log, in catch-up mode
        follower = next(n for n in cluster.nodes if n is not leader)
        cluster.kill(follower)
        cluster.restart(follower)
        cluster.wait_applied(timeout=120)
        assert _items_once_settled(follower.server_port, reference, keys) == reference
        for node in cluster.nodes:
            doc = node.status()
            assert doc["diverged"] is False, f"{node.name}: {doc['diverged_reason']}"
            assert doc["escapes"] == 0 and doc["serial_timeouts"] == 0
            assert "set serialize = true" not in node.log_path.read_text()


@pytest.mark.parametrize("hold", ["inputs", "outputs"])
def test_memcached_copies_hold_the_same_items_after_concurrent_writes(hold):
    """With outputs held, memcached's worker threads answer while another's input may not be
    committed: the leader reports that and holds inputs from then on."""
    with LocalCluster(n=3, server="memcached", transport="shm", hold=hold) as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        _run_clients(_worker, leader.server_port, 500)
        cluster.wait_applied(timeout=120)
        reference = _read_items(leader.server_port)
        assert len(reference) > 50
        _assert_the_others_match(cluster, leader, reference, KEYS)
        for node in cluster.nodes:
            assert node.status()["diverged"] is False, node.status()["diverged_reason"]
        assert "set serialize = true in [cluster]" in leader.log_path.read_text()
        status = leader.status()
        if hold == "outputs" and status["holding"] == "inputs":
            assert status["escapes"] > 0
            assert "holding inputs from now on" in leader.log_path.read_text()
        else:
            assert (status["holding"], status["escapes"]) == (hold, 0)


@pytest.mark.parametrize("serialize", [False, True])
def test_memcached_leader_killed_mid_workload_follower_takes_over_and_old_node_rejoins(serialize):
    """Serialized, four more clients race on shared keys throughout, and every copy agrees."""
    with LocalCluster(n=3, server="memcached", transport="shm", serialize=serialize) as cluster:
        cluster.start(timeout=120)

        def kill(old):
            cluster.kill(old)
            return cluster.wait_leader(timeout=30, exclude=old.name)

        stop = threading.Event()
        racers = [threading.Thread(target=_shared_keys_until, args=(cluster, i, stop))
                  for i in range(4 if serialize else 0)]
        for t in racers:
            t.start()
        try:
            old, new, acked, takeover = fault_the_leader_under_writers(cluster, kill, "memcached")
        finally:
            stop.set()
            for t in racers:
                t.join(30)
        print(f"new leader {new.name} gating {takeover:.2f}s after the kill")
        client = Client(("127.0.0.1", new.server_port), timeout=30)
        items = client.get_many(acked)
        client.close()
        missing = [k for k in acked if k not in items]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"

        cluster.restart(old)  # empty server, same data directory
        cluster.wait_applied(timeout=120)
        for node in cluster.nodes:
            doc = node.status()
            assert doc["diverged"] is False, doc["diverged_reason"]
        written = _every_key_written(acked)  # acknowledged or not
        if serialize:
            written += [f"shared{i}" for i in range(SHARED_KEYS)]
        reference = _read_items(new.server_port, written)
        _assert_the_others_match(cluster, new, reference, written)


def _every_key_written(acked: list[str]) -> list[str]:
    last: dict[str, int] = {}
    for key in acked:
        writer, seq = key.split(":")
        last[writer] = max(last.get(writer, 0), int(seq))
    return [f"{w}:{s}" for w, top in last.items() for s in range(top + 3)]
