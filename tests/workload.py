"""Concurrent client workloads against a replicated server, and checks that copies agree."""

from __future__ import annotations

import random
import threading

import redis as redis_py

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
