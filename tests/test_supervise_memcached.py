"""Three supervised memcached copies (4 worker threads each) converge under concurrent clients.

Each client works on its own keys: two worker threads racing on one key would be ordered by the
server's thread scheduling, which differs between copies (output checking reports exactly that;
see README, limitations).
"""

import random
import threading

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

from supervise.localcluster import LocalCluster

KEYS_PER_CLIENT = 30
CLIENTS = 10
KEYS = [f"c{c}:k{i}" for c in range(CLIENTS) for i in range(KEYS_PER_CLIENT)]


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


def test_memcached_copies_hold_the_same_items_after_concurrent_writes():
    with LocalCluster(n=3, server="memcached", transport="shm") as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        errors: list = []
        threads = [threading.Thread(target=_worker, args=(leader.server_port, i, 500, errors))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        cluster.wait_applied(timeout=120)
        for node in cluster.nodes:
            assert node.status()["diverged"] is False, node.status()["diverged_reason"]
        copies = {}
        for node in cluster.nodes:
            client = Client(("127.0.0.1", node.server_port))
            copies[node.name] = client.get_many(KEYS)
            client.close()
        reference = copies[leader.name]
        assert len(reference) > 50
        for name, items in copies.items():
            assert items == reference, f"{name} differs from the leader"
