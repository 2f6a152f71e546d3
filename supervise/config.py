"""The cluster file (TOML). Every error names the file, the key and what was expected."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

TRANSPORTS = ("shm", "tcp", "verbs", "auto")
DURABILITIES = ("fsync", "memory")
HOLDS = ("inputs", "outputs")


class ConfigError(Exception):
    """One line for the operator: file, key, what was expected."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    replication: str
    server: str
    status: str
    data_dir: Path

    @property
    def server_host(self) -> str:
        return self.server.rsplit(":", 1)[0]

    @property
    def server_port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    transport: str
    durability: str
    secret_file: Path | None
    heartbeat_ms: int
    election_timeout_ms: int
    vip: str | None
    vip_interface: str | None
    log_region_bytes: int
    spin_us: int = 200
    idle_poll: bool = True
    hold: str = "inputs"  # what a leader holds until its commit: the input, or outputs after it
    serialize: bool = False  # inputs take effect one at a time (tracer/serial.py)
    nodes: list[NodeConfig] = field(default_factory=list)

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.path}: no [[node]] named {name!r} (the file has {names})")

    def secret(self) -> bytes:
        if self.secret_file is None:
            return b""
        from consensus import SecretFileError, read_secret

        try:
            return read_secret(str(self.secret_file))
        except SecretFileError as exc:
            raise ConfigError(f"{self.path}: cluster.secret_file: {exc}") from None


def _endpoint(where: str, value: object) -> str:
    if not isinstance(value, str) or value.count(":") < 1:
        raise ConfigError(f"{where}: expected \"host:port\", got {value!r}")
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(f"{where}: expected an IP address before the port, got {host!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected a port 1..65535, got {port!r}")
    return value


def _get(table: dict, key: str, where: str, kind: type, default: object = ...) -> object:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}.{key}: missing (expected {kind.__name__})")
        return default
    value = table[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def load(path: str | Path) -> ClusterConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    cluster = doc.get("cluster")
    if not isinstance(cluster, dict):
        raise ConfigError(f"{path}: missing [cluster] table")
    where = f"{path}: cluster"
    unknown = set(cluster) - {"transport", "durability", "secret_file", "heartbeat_ms",
                              "election_timeout_ms", "vip", "vip_interface", "log_region_mib",
                              "spin_us", "idle_poll", "hold", "serialize"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    transport = _get(cluster, "transport", where, str, "auto")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{where}.transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
    durability = _get(cluster, "durability", where, str, "fsync")
    if durability not in DURABILITIES:
        raise ConfigError(f"{where}.durability: expected fsync or memory, got {durability!r}")
    secret = _get(cluster, "secret_file", where, str, None)
    if secret is None and transport in ("tcp", "verbs"):
        raise ConfigError(f"{where}.secret_file: required with transport {transport!r}")
    heartbeat = _get(cluster, "heartbeat_ms", where, int, 20)
    election = _get(cluster, "election_timeout_ms", where, int, 300)
    if heartbeat <= 0:
        raise ConfigError(f"{where}.heartbeat_ms: expected a positive integer, got {heartbeat}")
    if election <= 2 * heartbeat:
        raise ConfigError(f"{where}.election_timeout_ms: expected more than twice heartbeat_ms "
                          f"({heartbeat}), got {election}")
    vip = _get(cluster, "vip", where, str, None)
    vip_interface = _get(cluster, "vip_interface", where, str, None)
    if vip is not None:
        try:
            ipaddress.ip_interface(vip)
        except ValueError:
            raise ConfigError(f"{where}.vip: expected an address with prefix like "
                              f"\"10.20.0.100/24\", got {vip!r}") from None
        if "/" not in vip:
            raise ConfigError(f"{where}.vip: expected a prefix length, got {vip!r}")
        if vip_interface is None:
            raise ConfigError(f"{where}.vip_interface: required with vip")
    log_mib = _get(cluster, "log_region_mib", where, int, 64)
    spin_us = _get(cluster, "spin_us", where, int, 200)
    if spin_us < 0:
        raise ConfigError(f"{where}.spin_us: expected microseconds, 0 or more, got {spin_us}")
    idle_poll = _get(cluster, "idle_poll", where, bool, True)
    hold = _get(cluster, "hold", where, str, "inputs")
    if hold not in HOLDS:
        raise ConfigError(f"{where}.hold: expected inputs or outputs, got {hold!r}")
    serialize = _get(cluster, "serialize", where, bool, False)
    if serialize and hold != "inputs":
        raise ConfigError(f"{where}.serialize: expected false with hold = \"outputs\" (a server "
                          f"that serves from one thread needs no serializing), got true")
    nodes_doc = doc.get("node")
    if not isinstance(nodes_doc, list) or not nodes_doc:
        raise ConfigError(f"{path}: expected [[node]] tables, found none")
    if len(nodes_doc) < 3 or len(nodes_doc) % 2 == 0:
        raise ConfigError(f"{path}: node: expected an odd number of nodes, at least 3, "
                          f"got {len(nodes_doc)}")
    nodes = []
    seen: dict[str, str] = {}
    for i, table in enumerate(nodes_doc):
        w = f"{path}: node[{i}]"
        name = _get(table, "name", w, str)
        w = f"{path}: node {name!r}"
        unknown = set(table) - {"name", "replication", "server", "status", "data_dir"}
        if unknown:
            raise ConfigError(f"{w}.{sorted(unknown)[0]}: unknown key")
        node = NodeConfig(
            name=name,
            replication=_endpoint(f"{w}.replication", _get(table, "replication", w, str)),
            server=_endpoint(f"{w}.server", _get(table, "server", w, str)),
            status=_endpoint(f"{w}.status", _get(table, "status", w, str)),
            data_dir=base / _get(table, "data_dir", w, str),
        )
        for key in ("name", "replication", "status"):
            value = getattr(node, key)
            if value in seen and seen[value] != name:
                raise ConfigError(f"{w}.{key}: {value!r} is also used by node {seen[value]!r}")
            seen[value] = name
        nodes.append(node)
    return ClusterConfig(
        path=path, transport=transport, durability=durability,
        secret_file=(base / secret) if secret else None, heartbeat_ms=heartbeat,
        election_timeout_ms=election, vip=vip, vip_interface=vip_interface,
        log_region_bytes=log_mib << 20, spin_us=spin_us, idle_poll=idle_poll,
        hold=hold, serialize=serialize, nodes=nodes,
    )
