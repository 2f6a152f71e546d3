"""A whole replicated group on this machine: N server copies, N supervisors, one cluster file.

Used by `supervise demo`, the tests and the benchmarks. Every process it starts is stopped and
every file it writes is removed by ``stop()``, which also runs on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVERS = {
    "redis": lambda port, workdir: ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", workdir,
                                    "--enable-debug-command", "local"],
    "memcached": lambda port, workdir: ["memcached", "-U", "0", "-l", "127.0.0.1", "-p", str(port),
                                        "-t", "4", "-u", "root"],
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that can be bound now, taken from below the kernel's
    ephemeral range: a port from that range can go to some outgoing connection's local end
    between now and the moment its server binds it (a restarted replica then fails to start)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            socks.append(s)
            try:
                s.bind(("127.0.0.1", random.randrange(10000, low) if low > 11000 else 0))
            except OSError:
                socks.pop().close()
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)


@dataclass
class LocalNode:
    name: str
    server_port: int
    replication_port: int
    status_port: int
    server: subprocess.Popen | None = None
    supervisor: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    def status(self, timeout: float = 5.0) -> dict | None:
        """The node's status document; None when it does not answer within ``timeout``."""
        try:
            with urllib.request.urlopen(self.status_url, timeout=timeout) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None


class LocalCluster:
    def __init__(self, n: int = 3, server: str = "redis", transport: str = "shm",
                 durability: str = "fsync", workdir: str | None = None,
                 heartbeat_ms: int = 20, election_timeout_ms: int = 300,
                 env: dict[str, str] | None = None, hold: str = "inputs",
                 spin_us: int | None = None, serialize: bool = False) -> None:
        self.server_kind = server
        self.env = {**os.environ, **(env or {})}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="supervise-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * n)
        self.nodes = [LocalNode(f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2])
                      for i in range(n)]
        self.config = self.workdir / "cluster.toml"
        secret = self.workdir / "cluster.key"
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        lines = ["[cluster]", f'transport = "{transport}"', f'durability = "{durability}"',
                 'secret_file = "cluster.key"', f"heartbeat_ms = {heartbeat_ms}",
                 f"election_timeout_ms = {election_timeout_ms}", f'hold = "{hold}"', ""]
        if spin_us is not None:
            lines.insert(-1, f"spin_us = {spin_us}")
        if serialize:
            lines.insert(-1, "serialize = true")
        for node in self.nodes:
            lines += ["[[node]]", f'name = "{node.name}"',
                      f'replication = "127.0.0.1:{node.replication_port}"',
                      f'server = "127.0.0.1:{node.server_port}"',
                      f'status = "127.0.0.1:{node.status_port}"',
                      f'data_dir = "{node.name}-data"', ""]
        self.config.write_text("\n".join(lines))

    def node(self, name: str) -> LocalNode:
        return next(n for n in self.nodes if n.name == name)

    # ---- processes ------------------------------------------------------------------------------

    def start_server(self, node: LocalNode) -> None:
        workdir = self.workdir / f"{node.name}-server"
        workdir.mkdir(exist_ok=True)
        node.server = subprocess.Popen(SERVERS[self.server_kind](node.server_port, str(workdir)),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(node.server_port)

    def start_supervisor(self, node: LocalNode) -> None:
        assert node.server is not None
        node.log_path = self.workdir / f"{node.name}.log"
        log = open(node.log_path, "ab")
        node.supervisor = subprocess.Popen(
            [sys.executable, "-m", "supervise", "--pid", str(node.server.pid),
             "--config", str(self.config), "--node", node.name],
            stdout=log, stderr=log, env=self.env,
        )
        log.close()

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self.start_server(node)
        for node in self.nodes:
            self.start_supervisor(node)
        self.wait_leader(timeout)

    def wait_leader(self, timeout: float = 30.0, exclude: str | None = None) -> LocalNode:
        """The node gating its clients, once every live node agrees on it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.name != exclude and n.supervisor is not None
                       and n.supervisor.poll() is None]
            if not running:
                raise RuntimeError(f"every supervisor has exited; logs in {self.workdir}:\n{self.logs()}")
            for node in running:
                doc = node.status(timeout=1.0)  # a stopped supervisor answers nothing
                if doc and doc["role"] == "leader" and doc["gating"]:
                    return node
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout:.0f}s; logs in {self.workdir}")

    def kill(self, node: LocalNode) -> None:
        """kill -9 of the node's supervisor and server."""
        for proc in (node.supervisor, node.server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        node.supervisor = node.server = None

    def restart(self, node: LocalNode, fresh_data: bool = False) -> None:
        """Bring a killed node back with a fresh, empty server."""
        self.kill(node)
        if fresh_data:
            shutil.rmtree(self.workdir / f"{node.name}-data", ignore_errors=True)
        shutil.rmtree(self.workdir / f"{node.name}-server", ignore_errors=True)
        self.start_server(node)
        self.start_supervisor(node)

    def wait_applied(self, timeout: float = 60.0) -> int:
        """Wait until every live node has applied what the leader committed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            docs = [n.status(timeout=1.0) for n in self.nodes
                    if n.supervisor and n.supervisor.poll() is None]
            if docs and all(docs):
                committed = max(d["committed"] for d in docs)
                if all(d["applied"] >= committed for d in docs):
                    return committed
            time.sleep(0.1)
        raise TimeoutError("followers did not catch up")

    def stop(self) -> None:
        """Kill every process first, then wait: a killed supervisor takes about a second to
        end (the kernel detaches its probes), and theirs overlap."""
        procs = [p for node in self.nodes for p in (node.supervisor, node.server) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for node in self.nodes:
            if node.log_path and node.log_path.exists():
                out.append(f"--- {node.name} ---\n{node.log_path.read_text()[-4000:]}")
        return "\n".join(out)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
