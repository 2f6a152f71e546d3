"""A supervised Redis group across network namespaces, over the ``tcp`` transport.

    with NetnsCluster(vip=True) as c:
        c.start()
        leader = c.wait_leader()
        c.partition(leader); c.heal(leader)
        c.kill(i, "supervisor" | "server" | "both"); c.restart(i)
        c.pause(i); c.resume(i)                 # SIGSTOP / SIGCONT of a supervisor

Hosts 0..n-1 each run a redis-server bound to the host's own address and ``supervise --pid``
beside it (``Host.popen``, so both live in that host's namespace); host n is the clients' host.
Code that must talk from a namespace (status polls, redis clients) runs in a thread that entered
it (``enter_netns``), so the test process itself needs no address anywhere.

The virtual IP. Each server listens on its host's address and on the VIP (the namespace has
``net.ipv4.ip_nonlocal_bind=1``, so it can bind the VIP before holding it); only the host that
holds the VIP receives anything on it.

``stop()`` kills every process, removes the namespaces and the work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import Hosts, enter_netns
from .netns_faults import HostFaults
from .netns_vip import VipView
from .power_cut_fs import PowerCutDisk
from .procs import LaunchedServer, kill_process, reap
from .small_disk import small_disk

SERVER_PORT = 6379
REPLICATION_PORT = 9101
STATUS_PORT = 9201
VIP_HOST = 100
# `ip netns exec` mounts a fresh sysfs in a private mount namespace, which hides tracefs: bcc
# then finds no tracepoint formats and the tracer's probes do not compile. Mount it there again.
MOUNT_TRACEFS = ('mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; '
                 'exec "$@"')


@dataclass
class NetnsNode:
    index: int
    name: str
    addr: str
    ns: str
    server: subprocess.Popen | LaunchedServer | None = None
    supervisor: subprocess.Popen | None = None
    log_path: Path | None = None
    paused: bool = False
    partitioned: bool = False
    starts: int = 0

    @property
    def status_url(self) -> str:
        return f"http://{self.addr}:{STATUS_PORT}/status"

    def supervisor_alive(self) -> bool:
        return self.supervisor is not None and self.supervisor.poll() is None

    def server_alive(self) -> bool:
        return self.server is not None and self.server.poll() is None


class NetnsCluster(HostFaults, VipView):
    """Three (or n) hosts with Redis (or memcached) and a supervisor each, and one client host."""

    def __init__(self, n: int = 3, vip: bool = True, heartbeat_ms: int = 20,
                 election_timeout_ms: int = 300, durability: str = "fsync",
                 subnet: str = "10.77.0", launch_restarts: bool = False, hold: str = "inputs",
                 server: str = "redis", serialize: bool = False, data_disk_mb: int = 512,
                 power_cuts: bool = False) -> None:
        """``launch_restarts``: restart nodes as an operator should, with the launch form
        (`supervise ... -- redis-server ...`): the supervisor removes a VIP left on the host by a
        killed leader before the fresh server exists, so no client reaches a copy nobody holds.
        Each node's data_dir is a tmpfs of ``data_disk_mb`` (``fill_disk``), so fsync costs
        nothing there; with ``power_cuts``, a disk of that size that can lose power instead
        (``cut_power``: tests/power_cut_fs.py)."""
        if server not in ("redis", "memcached"):
            raise ValueError(f"server: redis or memcached, not {server!r}")
        self.n = n
        self.server_kind = server
        self.launch_restarts = launch_restarts
        self.subnet = subnet
        self.vip = f"{subnet}.{VIP_HOST}" if vip else None
        self.election_timeout_ms = election_timeout_ms
        self.workdir = Path(tempfile.mkdtemp(prefix="supervise-netns-"))
        self._disks = contextlib.ExitStack()
        self.hosts = Hosts(n + 1, subnet=subnet)
        try:
            self.nodes = [NetnsNode(i, f"n{i + 1}", self.hosts[i].addr, self.hosts[i].name)
                          for i in range(n)]
            self.client_host = self.hosts[n]
            self._executors = {node.ns: ThreadPoolExecutor(4, initializer=enter_netns,
                                                           initargs=(node.ns,))
                               for node in self.nodes}
            self._executors[self.client_host.name] = ThreadPoolExecutor(
                4, initializer=enter_netns, initargs=(self.client_host.name,))
            self.config = self.workdir / "cluster.toml"
            secret = self.workdir / "cluster.key"
            secret.write_bytes(os.urandom(32).hex().encode())
            secret.chmod(0o600)
            lines = ["[cluster]", 'transport = "tcp"', f'durability = "{durability}"',
                     'secret_file = "cluster.key"', f"heartbeat_ms = {heartbeat_ms}",
                     f"election_timeout_ms = {election_timeout_ms}", f'hold = "{hold}"',
                     f"serialize = {'true' if serialize else 'false'}"]
            if self.vip:
                lines += [f'vip = "{self.vip}/24"', 'vip_interface = "eth0"']
            lines.append("")
            for node in self.nodes:
                lines += ["[[node]]", f'name = "{node.name}"',
                          f'replication = "{node.addr}:{REPLICATION_PORT}"',
                          f'server = "{node.addr}:{SERVER_PORT}"',
                          f'status = "{node.addr}:{STATUS_PORT}"',
                          f'data_dir = "{node.name}-data"', ""]
            self.config.write_text("\n".join(lines))
            self.power_disks: dict[str, PowerCutDisk] = {}
            for node in self.nodes:
                if power_cuts:
                    disk = PowerCutDisk(self.data_dir(node), seed=node.index, capacity_mb=data_disk_mb)
                    self.power_disks[node.name] = self._disks.enter_context(disk)
                else:
                    self._disks.enter_context(small_disk(self.data_dir(node), data_disk_mb))
        except BaseException:
            self._disks.close()
            self.hosts.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    # ---- running code inside a namespace --------------------------------------------------------

    def in_ns(self, ns: str, fn: Any, *args: Any, timeout: float = 30) -> Any:
        return self._executors[ns].submit(fn, *args).result(timeout)

    def in_client_ns(self, fn: Any, *args: Any, timeout: float = 30) -> Any:
        return self.in_ns(self.client_host.name, fn, *args, timeout=timeout)

    @property
    def client_ns(self) -> str:
        return self.client_host.name

    @property
    def service_addr(self) -> str:
        """Where clients go: the VIP, else (without one) nothing fixed."""
        if self.vip is None:
            raise RuntimeError("no VIP configured: clients must follow the leader")
        return self.vip

    # ---- processes ------------------------------------------------------------------------------

    def node(self, key: int | str | NetnsNode) -> NetnsNode:
        if isinstance(key, NetnsNode):
            return key
        if isinstance(key, int):
            return self.nodes[key]
        return next(n for n in self.nodes if n.name == key)

    def _wait_listening(self, node: NetnsNode, port: int, timeout: float = 15.0) -> None:
        """Until the node's server listens on ``port``, read from /proc, never by connecting: Redis
        numbers its connections and shows the number in HELLO replies, so a probe connection
        on one copy and not on another makes their replies differ."""
        deadline = time.monotonic() + timeout
        want = f":{port:04X}"
        while True:
            assert node.server is not None
            if node.server.poll() is not None:
                raise RuntimeError(f"{node.name}: its server exited ({node.server.returncode})")
            try:
                with open(f"/proc/{node.server.pid}/net/tcp") as f:
                    rows = [line.split() for line in f]
                if any(row[1].endswith(want) and row[3] == "0A" for row in rows[1:]):  # 0A: LISTEN
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {node.addr}:{port} in {node.ns}")
            time.sleep(0.02)

    def _server_argv(self, node: NetnsNode) -> list[str]:
        """A fresh, empty server for the node (a redis-server's directory emptied)."""
        workdir = self.workdir / f"{node.name}-server"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        bind = [node.addr]
        if self.vip:
            self.hosts[node.index].run(["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"], timeout=10)
            bind.append(self.vip)
        if self.server_kind == "memcached":
            return ["memcached", "-U", "0", "-l", ",".join(bind), "-p", str(SERVER_PORT), "-t", "4",
                    "-u", "root"]
        return ["redis-server", "--port", str(SERVER_PORT), "--bind", *bind, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", str(workdir),
                "--enable-debug-command", "local"]

    def start_server(self, node: NetnsNode) -> None:
        node.server = self.hosts[node.index].popen(self._server_argv(node), stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL)
        self._wait_listening(node, SERVER_PORT)

    def launch(self, node: NetnsNode, timeout: float = 60.0) -> None:
        """Supervisor first, then the server it starts under its tracer (the launch form)."""
        self.start_supervisor(node, ["--", *self._server_argv(node)])
        deadline = time.monotonic() + timeout
        while True:
            pid = (self.status(node) or {}).get("server_pid") or 0
            if pid:
                break
            if not node.supervisor_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: the supervisor did not start its server "
                                   f"(see {node.log_path})")
            time.sleep(0.05)
        node.server = LaunchedServer(pid)
        self._wait_listening(node, SERVER_PORT)

    def start_supervisor(self, node: NetnsNode, launch: list[str] | None = None) -> None:
        """With ``launch`` (``["--", CMD...]``) the supervisor starts the server itself."""
        if launch is None:
            assert node.server is not None
        target = launch if launch is not None else ["--pid", str(node.server.pid)]  # type: ignore[union-attr]
        node.log_path = self.workdir / f"{node.name}.log"
        with open(node.log_path, "ab") as log:
            log.write(f"=== start {node.starts} at {time.time():.3f}\n".encode())
            node.supervisor = self.hosts[node.index].popen(
                ["sh", "-c", MOUNT_TRACEFS, "supervise", sys.executable, "-m", "supervise",
                 "--config", str(self.config), "--node", node.name, *target],
                stdout=log, stderr=log,
                env={**os.environ, "SUPERVISE_FAILPOINTS": str(self.failpoints_file(node))})
        node.starts += 1
        node.paused = False

    def start(self, timeout: float = 60.0) -> NetnsNode:
        """Start everything and wait for a gating leader. A supervisor that leaves meanwhile is
        restarted with a fresh server, as its operator would."""
        for node in self.nodes:
            self.start_server(node)
        for node in self.nodes:
            self.start_supervisor(node)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.wait_leader(min(5.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
            for node in self.nodes:
                if not node.supervisor_alive():
                    self.restart(node)

    def kill(self, key: int | str | NetnsNode, what: str = "both") -> None:
        """kill -9 of the node's supervisor, server or both (waits until they are gone)."""
        node = self.node(key)
        procs = {"supervisor": [node.supervisor], "server": [node.server],
                 "both": [node.supervisor, node.server]}[what]
        for proc in procs:
            kill_process(proc)
        for proc in procs:
            reap(proc)
        node.paused = False

    def restart(self, key: int | str | NetnsNode, fresh_data: bool = False,
                clear_stale_vip: bool = False) -> bool:
        """Both processes gone (whatever is left is killed), then a fresh, empty server and a
        supervisor on the same data directory: it replays the log.

        ``clear_stale_vip``: first remove the VIP from the host if it is still there (left by a
        supervisor killed with -9, which a restarted supervisor does not remove). Returns whether
        it had to."""
        node = self.node(key)
        self.kill(node, "both")
        stale = clear_stale_vip and node.name in self.vip_holders()
        if stale:
            subprocess.run(["ip", "-n", node.ns, "addr", "del", f"{self.vip}/24", "dev", "eth0"],
                           capture_output=True, timeout=10)
        if fresh_data:
            shutil.rmtree(self.workdir / f"{node.name}-data", ignore_errors=True)
        if self.launch_restarts:
            self.launch(node)
        else:
            self.start_server(node)
            self.start_supervisor(node)
        return stale

    # ---- status ---------------------------------------------------------------------------------

    def status(self, key: int | str | NetnsNode, timeout: float = 1.0) -> dict | None:
        """The node's /status, read from inside its own host (so also while it is cut off)."""
        node = self.node(key)
        if not node.supervisor_alive() or node.paused:
            return None

        def get() -> dict | None:
            try:
                with urllib.request.urlopen(node.status_url, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except Exception:  # noqa: BLE001 - refused, reset, cut short (IncompleteRead), bad JSON
                return None

        try:
            return self.in_ns(node.ns, get, timeout=timeout + 5)
        except TimeoutError:
            return None

    def statuses(self) -> dict[str, dict | None]:
        return {node.name: self.status(node) for node in self.nodes}

    def leader(self, exclude: tuple[str, ...] = ()) -> NetnsNode | None:
        """The gating leader with the highest ballot among reachable, connected nodes."""
        best: tuple[int, NetnsNode] | None = None
        for node in self.nodes:
            if node.name in exclude or node.partitioned:
                continue
            doc = self.status(node)
            if doc and doc["role"] == "leader" and doc["gating"]:
                if best is None or doc["ballot"] > best[0]:
                    best = (doc["ballot"], node)
        return best[1] if best else None

    def wait_leader(self, timeout: float = 30.0, exclude: tuple[str, ...] = ()) -> NetnsNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.leader(exclude)
            if node is not None:
                return node
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout:.0f}s; logs in {self.workdir}")

    def wait_applied(self, timeout: float = 60.0) -> int:
        """Every node's supervisor is up and has applied everything the group committed."""
        deadline = time.monotonic() + timeout
        docs: dict[str, dict | None] = {}
        while time.monotonic() < deadline:
            docs = self.statuses()
            if all(docs.values()):
                committed = max(d["committed"] for d in docs.values())
                if all(d["applied"] >= committed and d["committed"] >= committed for d in docs.values()):
                    return committed
            time.sleep(0.1)
        raise TimeoutError(f"the nodes did not converge: {docs}")

    # ---- redis from the client host ------------------------------------------------------------

    def redis_call(self, addr: str, *command: Any, timeout: float = 5.0) -> Any:
        """One command to ``addr`` from the client host (a fresh connection)."""
        import redis as redis_py

        def call() -> Any:
            client = redis_py.Redis(host=addr, port=SERVER_PORT, socket_timeout=timeout,
                                    socket_connect_timeout=timeout)
            try:
                return client.execute_command(*command)
            finally:
                client.close()

        return self.in_client_ns(call, timeout=2 * timeout + 5)

    def snapshot(self, key: int | str | NetnsNode, keys: list[str] | None = None) -> dict:
        """The node's copy, read from inside its host (a stray client there, counted as such);
        of memcached, only ``keys``."""
        import redis as redis_py
        from pymemcache.client.base import Client as MemcacheClient

        node = self.node(key)

        def read_memcached() -> dict:
            client = MemcacheClient((node.addr, SERVER_PORT), timeout=10)
            try:
                items = client.get_many(keys or [])
                return {k: items.get(k) for k in keys or []}
            finally:
                client.close()

        if self.server_kind == "memcached":
            return self.in_ns(node.ns, read_memcached)

        def read() -> dict:
            client = redis_py.Redis(host=node.addr, port=SERVER_PORT, socket_timeout=10)
            try:
                names = keys if keys is not None else sorted(client.scan_iter(count=1000))
                values = client.mget(names) if names else []
                return {k if isinstance(k, str) else k.decode(): v for k, v in zip(names, values,
                                                                                       strict=True)}
            finally:
                client.close()

        return self.in_ns(node.ns, read)

    def logs(self, tail: int = 6000) -> str:
        out = []
        for node in self.nodes:
            if node.log_path and node.log_path.exists():
                out.append(f"--- {node.name} ---\n{node.log_path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def save_logs(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            if node.log_path and node.log_path.exists():
                shutil.copy(node.log_path, Path(directory) / node.log_path.name)

    def stop(self) -> None:
        for node in self.nodes:
            for proc in (node.supervisor, node.server):
                kill_process(proc)
        for node in self.nodes:
            for proc in (node.supervisor, node.server):
                reap(proc)
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._disks.close()
        self.hosts.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

