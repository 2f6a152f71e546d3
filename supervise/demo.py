"""`supervise demo`: three Redis copies become one highly available service, on this machine.

Starts three Redis servers and three supervisors (shm transport), runs a mixed write workload
from several clients through the leader, shows that the three copies hold identical data, moves
leadership with `supervise handover`, kills the leader (supervisor and server, kill -9), shows a
follower taking over with every acknowledged write present, brings the old node back with an
empty server and shows it converge.
Everything it started is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import random
import socket
import threading
import time

from .cli import UsageError
from .config import load
from .handover import HandoverError, run_handover
from .localcluster import LocalCluster, LocalNode
from .status_cmd import run_status

CLIENTS = 6
OPS_PER_CLIENT = 300


class Resp:
    """The smallest Redis client that will do: one connection, one command at a time."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args: object) -> object:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self) -> object:
        line = self.file.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"unexpected reply {line!r}")

    def close(self) -> None:
        self.sock.close()


def _workload(port: int, client_id: int, acked: list[str]) -> None:
    rng = random.Random(client_id)
    r = Resp(port)
    try:
        for seq in range(OPS_PER_CLIENT):
            op = rng.randrange(5)
            n = rng.randrange(200)
            if op == 0:
                key = f"order:{client_id}:{seq}"
                r("SET", key, seq)
                acked.append(key)
            elif op == 1:
                r("INCRBY", f"counter:{n % 20}", rng.randrange(1, 10))
            elif op == 2:
                r("LPUSH", f"queue:{n % 10}", f"{client_id}-{seq}")
            elif op == 3:
                r("SADD", f"tags:{n % 10}", rng.randrange(100))
            else:
                r("HSET", f"user:{n}", "visits", seq)
    finally:
        r.close()


def _digests(cluster: LocalCluster) -> dict[str, str]:
    out = {}
    for node in cluster.nodes:
        if node.server is None:
            continue
        r = Resp(node.server_port)
        out[node.name] = f"{r('DEBUG', 'DIGEST')} ({r('DBSIZE')} keys)"
        r.close()
    return out


def _show_digests(cluster: LocalCluster, leader: LocalNode) -> bool:
    digests = _digests(cluster)
    for name, digest in digests.items():
        print(f"   {name}{' (leader)' if name == leader.name else '         '}  {digest}")
    same = len(set(digests.values())) == 1
    print("   -> the copies are identical" if same else "   -> THE COPIES DIFFER")
    return same


def run_demo(argv: list[str]) -> int:
    if argv:
        raise UsageError(f"demo takes no arguments (got {' '.join(argv)})")
    cluster = LocalCluster(n=3, server="redis", transport="shm")
    try:
        print(f"1. starting 3 Redis servers and 3 supervisors (cluster file {cluster.config})")
        started = time.monotonic()
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        print(f"   leader {leader.name} (Redis on 127.0.0.1:{leader.server_port}) after "
              f"{time.monotonic() - started:.1f}s")

        print(f"2. {CLIENTS} clients send {CLIENTS * OPS_PER_CLIENT} mixed writes through the leader")
        acked: list[str] = []
        started = time.monotonic()
        threads = [threading.Thread(target=_workload, args=(leader.server_port, i, acked))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        print(f"   done in {took:.1f}s ({CLIENTS * OPS_PER_CLIENT / took:.0f} writes/s, each "
              f"committed on a majority before Redis saw it)")
        cluster.wait_applied()
        print("3. the three copies (DEBUG DIGEST of each whole dataset, read from each Redis directly:\n"
              "   the followers count a stray client and defer their candidacy from now on):")
        ok = _show_digests(cluster, leader)

        to = next(n for n in cluster.nodes if n is not leader)
        print(f"4. supervise handover --to {to.name}: leadership moves, nothing stops")
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                run_handover(load(cluster.config), to.name)
        except HandoverError as exc:
            said.write(f"{exc}\n")
            ok = False
        print(f"   {said.getvalue().strip()}")
        leader = cluster.wait_leader(timeout=30)
        running = all(p is not None and p.poll() is None
                      for n in cluster.nodes for p in (n.supervisor, n.server))
        print(f"   {leader.name} leads; every supervisor and Redis still runs" if running
              else "   A PROCESS STOPPED")
        ok = ok and running and leader is to

        print(f"5. kill -9 of the leader {leader.name}: its supervisor and its Redis")
        killed = time.monotonic()
        cluster.kill(leader)
        new = cluster.wait_leader(timeout=30, exclude=leader.name)
        print(f"   {new.name} leads and gates its clients {time.monotonic() - killed:.2f}s later")
        r = Resp(new.server_port)
        present = sum(1 for key in acked if r("GET", key) is not None)
        r.close()
        print(f"   {present} of {len(acked)} acknowledged SETs are on the new leader")
        ok = ok and present == len(acked)

        print(f"6. {leader.name} comes back with an empty Redis and replays the log")
        cluster.restart(leader)
        cluster.wait_applied(timeout=120)
        ok = _show_digests(cluster, new) and ok

        print("7. supervise status:")
        run_status(load(cluster.config), as_json=False)
        print("   metrics: " + ", ".join(f"http://127.0.0.1:{n.status_port}/metrics"
                                         for n in cluster.nodes))
        print("demo " + ("passed: one service, three copies, nothing lost" if ok else "FAILED"))
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up")
        return 130
    finally:
        cluster.stop()
