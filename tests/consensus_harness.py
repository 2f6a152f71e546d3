"""Replica processes for the consensus tests and benchmark.

Child side (``python tests/consensus_harness.py CONFIG.json``): runs one Replica, records every
applied entry to ``applied`` (one line per index: ``D <index> <payload hex>`` or ``N <index>`` for
a no-op, written unbuffered so a kill -9 loses nothing that was written), and serves a line
protocol on a unix socket::

    P <id> <hex>   -> "<id> OK <index>" | "<id> NL <leader|->" | "<id> ERR <text>"   (async)
    S              -> one JSON line of status
    D <timeout> [<peer>] -> "OK 1|0" after step_down (to ``peer``)
    Q              -> closes the replica and exits

Parent side: :class:`ReplicaProc` and :class:`Cluster` start, kill, restart and talk to them, and
:func:`check_history` verifies what every incarnation of every replica applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# ---------------------------------------------------------------------------------------------
# child
# ---------------------------------------------------------------------------------------------
def _child(cfg_path: str) -> None:
    import faulthandler
    import logging

    from consensus import NotLeader, Peer, Replica, ReplicaConfig

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # stack dump for debugging hangs
    spec = json.loads(Path(cfg_path).read_text())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {spec['name']} %(threadName)s %(levelname)s %(message)s")
    record = spec.get("record", True)
    fd = os.open(spec["applied"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if record else -1

    apply_delay = spec.get("apply_delay_s", 0.0)  # a slow application, as a copy replaying

    def on_commit(index: int, payload: bytes) -> None:
        if apply_delay:
            time.sleep(apply_delay)
        if record:
            os.write(fd, b"D %d %s\n" % (index, payload.hex().encode()))

    def on_noop(index: int) -> None:
        if record:
            os.write(fd, b"N %d\n" % index)

    cfg = ReplicaConfig(
        name=spec["name"], endpoint=spec["endpoint"],
        peers=[Peer(n, e) for n, e in spec["peers"].items()], data_dir=Path(spec["data_dir"]),
        transport=spec["transport"], secret=bytes.fromhex(spec["secret"]), durability=spec["durability"],
        heartbeat_ms=spec.get("heartbeat_ms", 20), election_timeout_ms=spec.get("election_timeout_ms", 300),
        log_region_bytes=spec.get("log_region_bytes", 8 << 20), thrifty=spec.get("thrifty", False),
        segment_bytes=spec.get("segment_bytes", 64 << 20))
    rfd = os.open(spec["roles"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def on_role(role: str, ballot: int, leader: str | None) -> None:
        os.write(rfd, f"{role} {ballot} {leader or '-'}\n".encode())

    rep = Replica(cfg, on_commit, on_role_change=on_role, on_noop=on_noop)
    rep.start()
    sock_path = spec["socket"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(64)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        wlock = threading.Lock()

        def reply(line: str) -> None:
            with wlock, contextlib.suppress(OSError):
                conn.sendall(line.encode() + b"\n")

        f = conn.makefile("rb")
        for raw in f:
            parts = raw.decode().split()
            if not parts:
                continue
            op = parts[0]
            if op == "P":
                rid = parts[1]
                fut = rep.propose(bytes.fromhex(parts[2]) if len(parts) > 2 else b"")

                def done(fu, rid=rid) -> None:
                    exc = fu.exception()
                    if exc is None:
                        reply(f"{rid} OK {fu.result()}")
                    elif isinstance(exc, NotLeader):
                        reply(f"{rid} NL {exc.leader or '-'}")
                    else:
                        reply(f"{rid} ERR {type(exc).__name__}")
                fut.add_done_callback(done)
            elif op == "S":
                st = {"rss": _rss(), "name": rep.config.name, "role": rep.role, "ballot": rep.ballot,
                      "leader": rep.leader,
                      "commit": rep.commit_index, "applied": rep.applied_index, "durable": rep.durable_index,
                      "last": rep.last_index, "peers": rep.peer_status(), "pid": os.getpid(),
                      "deferring": rep.deferring}
                reply(json.dumps(st))
            elif op == "M":
                from prometheus_client import generate_latest

                reply(json.dumps(generate_latest().decode()))
            elif op == "B":
                reply(json.dumps(measure(lambda p: rep.propose(p).result(10), parts[1],
                                         [float(x) for x in parts[2:]])))
            elif op == "F":
                rep.transport.inject(json.loads(" ".join(parts[1:])))
                reply("OK")
            elif op == "D":
                to = parts[2] if len(parts) > 2 else None
                reply(f"OK {int(rep.step_down(float(parts[1]), to))}")
            elif op == "W":
                rep.withdraw(float(parts[1]))
                reply("OK")
            elif op == "R":
                rep.defer_candidacy()
                reply("OK")
            elif op == "Q":
                stop.set()
                reply("BYE")
                break
        conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    rep.close()
    srv.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    os._exit(0)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(commit, kind: str, args: list[float]) -> dict:
    """In-process measurement on a leader: ``commit(payload)`` proposes and waits for the commit.
    ``lat COUNT SIZE``: one proposer, latency percentiles; ``tput THREADS SECONDS SIZE``:
    proposers in threads, commits per second. The consensus benchmark runs the same on PySyncObj."""
    import random as _random

    if kind == "lat":
        count, size = int(args[0]), int(args[1])
        lat = []
        for _ in range(count):
            payload = _random.randbytes(size)
            t0 = time.perf_counter()
            commit(payload)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return {"count": count, "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                "mean_us": sum(lat) / len(lat) * 1e6}
    threads, duration, size = int(args[0]), args[1], int(args[2])
    done = [0] * threads
    stop = threading.Event()

    def worker(k: int) -> None:
        payload = _random.randbytes(size)
        while not stop.is_set():
            commit(payload)
            done[k] += 1

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"ops": sum(done), "seconds": elapsed, "ops_per_s": sum(done) / elapsed}


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
class Client:
    """A synchronous connection to one replica's control socket (one request at a time)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")
        self.n = 0

    def call(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        got = self.f.readline()
        if not got:
            raise ConnectionError("replica closed the connection")
        return got.decode().strip()

    def propose(self, payload: bytes) -> tuple[str, str]:
        self.n += 1
        parts = self.call(f"P {self.n} {payload.hex()}").split()
        return parts[1], parts[2] if len(parts) > 2 else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class ReplicaProc:
    name: str
    spec: dict
    workdir: Path
    netns: str | None = None
    proc: subprocess.Popen | None = None
    incarnation: int = 0
    applied_files: list[Path] = field(default_factory=list)

    @property
    def socket_path(self) -> str:
        return str(self.workdir / f"{self.name}.sock")

    def start(self) -> None:
        self.incarnation += 1
        applied = self.workdir / f"applied-{self.name}-{self.incarnation}.log"
        self.applied_files.append(applied)
        spec = dict(self.spec, applied=str(applied), socket=self.socket_path,
                    roles=str(self.workdir / f"roles-{self.name}-{self.incarnation}.log"))
        cfg = self.workdir / f"{self.name}.json"
        cfg.write_text(json.dumps(spec))
        cmd = [PY, str(REPO / "tests" / "consensus_harness.py"), str(cfg)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        err = open(self.workdir / f"{self.name}-{self.incarnation}.err", "wb")  # noqa: SIM115
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        env = dict(os.environ, **self.spec.get("env", {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=env,
                                     start_new_session=True)
        err.close()
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.02)

    def roles(self) -> list[tuple[str, int, str]]:
        path = self.workdir / f"roles-{self.name}-{self.incarnation}.log"
        return [(a, int(b), c) for a, b, c in (ln.split() for ln in path.read_text().splitlines())]

    def stderr_tail(self, n: int = 4000) -> str:
        path = self.workdir / f"{self.name}-{self.incarnation}.err"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        try:
            c = Client(self.socket_path, timeout=timeout)
            c.call("Q")
            c.close()
            self.proc.wait(timeout)
        except Exception:  # noqa: BLE001 - fall back to SIGKILL
            self.kill()

    def status(self, timeout: float = 2.0) -> dict | None:
        if not self.alive():
            return None
        try:
            c = Client(self.socket_path, timeout=timeout)
            try:
                return json.loads(c.call("S"))
            finally:
                c.close()
        except (OSError, ValueError, ConnectionError):
            return None


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _child(sys.argv[1])
