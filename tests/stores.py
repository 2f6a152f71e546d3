"""Redis and memcached as the tests' clients use them: read, write and compare-and-set of a key,
and adds to one set (Jepsen's set workload), for the fault campaign (tests/campaign.py) and the
failover workloads (tests/workload.py). A connection does not reconnect by itself: it would
reconnect to the same copy, even one that no longer leads (a stray client there).

Redis: GET, SET, a Lua compare-and-set (EVAL), SADD and SORT. memcached (four worker threads, with
``cluster.serialize``, since every client shares the keys): get, set, ``gets`` then ``cas`` and
``append`` of `` element`` to one key. memcached's compare-and-set is two requests: a value other
than the expected one at the ``gets`` fails it there, and a ``cas`` answered EXISTS fails it at
that moment, when the value is no longer the expected one (every value written is unique).
"""

from __future__ import annotations

from typing import Any

import redis as redis_py
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
from redis.backoff import NoBackoff
from redis.retry import Retry

ADDED = "added"  # the set workload's key
CAS_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) "
           "return 1 else return 0 end")


class RedisStore:
    name = "redis"
    serialize = False
    lost: tuple = (redis_py.ConnectionError, redis_py.TimeoutError, OSError)  # outcome unknown
    refused: tuple = (redis_py.ResponseError,)  # did not happen

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout

    def connect(self, addr: str) -> redis_py.Connection:
        conn = redis_py.Connection(host=addr, port=self.port, socket_timeout=self.timeout,
                                   socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
        conn.connect()
        return conn

    @staticmethod
    def close(conn: redis_py.Connection) -> None:
        conn.disconnect()

    @staticmethod
    def _call(conn: redis_py.Connection, *command: Any) -> Any:
        conn.send_command(*command)
        return conn.read_response()

    def get(self, conn: redis_py.Connection, key: str) -> str | None:
        value = self._call(conn, "GET", key)
        return value.decode() if value is not None else None

    def set(self, conn: redis_py.Connection, key: str, value: str) -> None:
        self._call(conn, "SET", key, value)

    def cas(self, conn: redis_py.Connection, key: str, expected: str, new: str) -> bool:
        return bool(self._call(conn, "EVAL", CAS_LUA, 1, key, expected, new))

    def add(self, conn: redis_py.Connection, element: str) -> None:
        self._call(conn, "SADD", ADDED, element)

    def members(self, conn: redis_py.Connection) -> set[str]:
        """Sorted by the server: SMEMBERS lists a set in its hash table's order, and Redis seeds
        its hash function at random in each process, so the copies' replies, compared by output
        checking, would differ."""
        return {m.decode() for m in self._call(conn, "SORT", ADDED, "ALPHA")}

    def start_set(self, conn: redis_py.Connection) -> None:
        """Nothing: SADD makes the set."""


class MemcachedStore(RedisStore):
    name = "memcached"
    serialize = True
    lost = (MemcacheUnexpectedCloseError, OSError)
    refused = (MemcacheError,)

    def connect(self, addr: str) -> MemcacheClient:
        client = MemcacheClient((addr, self.port), timeout=self.timeout,
                                connect_timeout=self.timeout)
        client._connect()  # now, as Redis's connect does: a refused connection is no operation
        return client

    @staticmethod
    def close(conn: MemcacheClient) -> None:
        conn.close()

    def get(self, conn: MemcacheClient, key: str) -> str | None:
        value = conn.get(key)
        return value.decode() if value is not None else None

    def set(self, conn: MemcacheClient, key: str, value: str) -> None:
        if not conn.set(key, value, noreply=False):
            raise MemcacheError(f"set {key} was not stored")

    def cas(self, conn: MemcacheClient, key: str, expected: str, new: str) -> bool:
        value, token = conn.gets(key)
        if value is None or value.decode() != expected:
            return False
        return bool(conn.cas(key, new, token, noreply=False))

    def add(self, conn: MemcacheClient, element: str) -> None:
        if not conn.append(ADDED, f" {element}", noreply=False):
            raise MemcacheError(f"append to {ADDED} was not stored")

    def members(self, conn: MemcacheClient) -> set[str]:
        value = conn.get(ADDED)
        return set(value.decode().split()) if value is not None else set()

    def start_set(self, conn: MemcacheClient) -> None:
        self.set(conn, ADDED, "")  # append needs the item to exist


STORES = {store.name: store for store in (RedisStore, MemcachedStore)}
