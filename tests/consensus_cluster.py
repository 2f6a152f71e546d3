"""A cluster of replica processes, a concurrent propose load and the history checker."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.consensus_harness import Client, ReplicaProc
from tests.procs import free_port

SECRET = os.urandom(16).hex()


class Cluster:
    def __init__(self, n: int = 3, transport: str = "shm", durability: str = "fsync",
                 hosts: list[str] | None = None, netns: list[str] | None = None,
                 election_timeout_ms: int = 300, heartbeat_ms: int = 20, log_region_bytes: int = 4 << 20,
                 record: bool = True, env: dict[str, str] | None = None, thrifty: bool = False,
                 segment_bytes: int = 64 << 20) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="consensus-test-"))
        self.names = [f"r{i}" for i in range(n)]
        hosts = hosts or ["127.0.0.1"] * n
        self.endpoints = {nm: f"{hosts[i]}:{free_port() if hosts[i] == '127.0.0.1' else 7400 + i}"
                          for i, nm in enumerate(self.names)}
        self.reps: dict[str, ReplicaProc] = {}
        for i, nm in enumerate(self.names):
            spec = {"name": nm, "endpoint": self.endpoints[nm],
                    "peers": {p: e for p, e in self.endpoints.items() if p != nm},
                    "data_dir": str(self.dir / f"data-{nm}"), "transport": transport, "secret": SECRET,
                    "durability": durability, "heartbeat_ms": heartbeat_ms,
                    "election_timeout_ms": election_timeout_ms, "log_region_bytes": log_region_bytes,
                    "record": record, "env": env or {}, "thrifty": thrifty,
                    "segment_bytes": segment_bytes}
            self.reps[nm] = ReplicaProc(nm, spec, self.dir, netns[i] if netns else None)

    def start(self) -> Cluster:
        for r in self.reps.values():
            r.start()
        return self

    def close(self) -> None:
        for r in self.reps.values():
            with contextlib.suppress(Exception):
                r.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            for r in self.reps.values():
                print(f"---- {r.name} stderr tail ----\n{r.stderr_tail(3000)}")
        self.close()

    def statuses(self) -> dict[str, dict | None]:
        return {nm: r.status() for nm, r in self.reps.items()}

    def leader(self, timeout: float = 20.0, exclude: set[str] | None = None) -> str:
        """Wait until one live replica leads and a majority agrees on it; return its name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = {k: v for k, v in self.statuses().items() if v is not None}
            leaders = [k for k, v in st.items() if v["role"] == "leader" and k not in (exclude or set())]
            if len(leaders) == 1:
                lead = leaders[0]
                agree = sum(1 for v in st.values() if v["leader"] == lead)
                if agree >= len(self.names) // 2 + 1:
                    return lead
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout}s: {self.statuses()}")

    def wait_applied(self, index: int, names: list[str] | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        names = names or [n for n, r in self.reps.items() if r.alive()]
        while time.monotonic() < deadline:
            st = [self.reps[n].status() for n in names]
            if all(s is not None and s["applied"] >= index for s in st):
                return
            time.sleep(0.05)
        raise TimeoutError(f"replicas did not apply up to {index}: {self.statuses()}")


class Load:
    """Concurrent proposers with unique payloads; records what was acknowledged."""

    def __init__(self, cluster: Cluster, threads: int = 4, size: int = 48, pause: float = 0.0) -> None:
        self.c = cluster
        self.nthreads = threads
        self.size = size
        self.pause = pause
        self.acked: dict[bytes, int] = {}
        self.attempts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def __enter__(self) -> Load:
        for k in range(self.nthreads):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_acks(self, more: int, timeout: float = 30.0) -> None:
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load made no progress: {self.count()} < {target}: {self.c.statuses()}")
            time.sleep(0.02)

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        clients: dict[str, Client] = {}
        target = rng.choice(self.c.names)
        seq = 0
        while not self._stop.is_set():
            seq += 1
            payload = f"t{k}-{seq}-".encode() + os.urandom(max(0, self.size - 12)).hex().encode()[:self.size]
            try:
                cl = clients.get(target)
                if cl is None:
                    cl = clients[target] = Client(self.c.reps[target].socket_path, timeout=10)
                with self._lock:
                    self.attempts += 1
                verdict, arg = cl.propose(payload)
            except (OSError, ConnectionError):
                old = clients.pop(target, None)
                if old is not None:
                    old.close()
                target = rng.choice(self.c.names)
                self._stop.wait(0.05)
                continue
            if verdict == "OK":
                with self._lock:
                    self.acked[payload] = int(arg)
                if self.pause:
                    self._stop.wait(self.pause)
            elif verdict == "NL" and arg in self.c.names:
                target = arg
            else:
                target = rng.choice(self.c.names)
                self._stop.wait(0.02)
        for cl in clients.values():
            cl.close()


class Proposer:
    """Proposes through whichever replica leads, keeping a connection to it; after NotLeader or
    a lost leadership it finds the leader again and retries with a fresh payload (the attempt
    number is passed to ``make_payload``), so that no payload can be committed twice."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.cl: Client | None = None

    def propose(self, make_payload: Callable[[int], bytes], timeout: float = 60) -> tuple[bytes, int]:
        deadline = time.monotonic() + timeout
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            payload = make_payload(attempt)
            try:
                if self.cl is None:
                    self.cl = Client(self.c.reps[self.c.leader()].socket_path, timeout=15)
                verdict, arg = self.cl.propose(payload)
            except (OSError, ConnectionError, TimeoutError):
                verdict, arg = "ERR", ""
            if verdict == "OK":
                return payload, int(arg)
            self.close()
        raise TimeoutError(f"no proposal acknowledged within {timeout}s")

    def close(self) -> None:
        if self.cl is not None:
            self.cl.close()
            self.cl = None


def read_applied(path: Path) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        parts = line.split()
        if not parts or (parts[0] == b"D" and len(parts) not in (2, 3)):
            continue
        if parts[0] == b"N":
            out.append((int(parts[1]), None))
        else:
            out.append((int(parts[1]), bytes.fromhex(parts[2].decode()) if len(parts) > 2 else b""))
    return out


def check_history(cluster: Cluster, acked: dict[bytes, int], require_all: list[str] | None = None) -> int:
    """The safety checker. Returns the highest index applied anywhere.

    * every incarnation applied indices 1, 2, 3, ... in order (no gap, no repeat)
    * no index carries two different payloads across all replicas and incarnations
    * every acknowledged payload is in the log exactly once, at the acknowledged index
    * every replica in ``require_all`` (last incarnation) applied every acknowledged payload
    """
    chosen: dict[int, bytes | None] = {}
    for r in cluster.reps.values():
        for path in r.applied_files:
            hist = read_applied(path)
            for k, (idx, payload) in enumerate(hist):
                assert idx == k + 1, f"{path.name}: applied index {idx} at position {k + 1}"
                if idx in chosen:
                    assert chosen[idx] == payload, \
                        f"index {idx}: {chosen[idx]!r} vs {payload!r} ({path.name})"
                else:
                    chosen[idx] = payload
    where: dict[bytes, list[int]] = {}
    for idx, payload in chosen.items():
        if payload is not None:
            where.setdefault(payload, []).append(idx)
    for payload, idx in acked.items():
        got = where.get(payload)
        assert got == [idx], f"acknowledged {payload[:20]!r}@{idx} found at {got}"
    for name in require_all or []:
        last = cluster.reps[name].applied_files[-1]
        have = {p for _, p in read_applied(last)}
        missing = [p for p in acked if p not in have]
        assert not missing, f"{name} lacks {len(missing)} acknowledged entries, e.g. {missing[0][:20]!r}"
    return max(chosen, default=0)


def settle(cluster: Cluster, load: Load, names: list[str] | None = None) -> None:
    """Stop the load, then wait until the live replicas applied everything acknowledged."""
    load.stop()
    top = max(load.acked.values(), default=0)
    cluster.wait_applied(top, names)


Fault = Callable[[Cluster], None]
