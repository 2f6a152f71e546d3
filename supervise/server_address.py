"""Where a node's copy of the server serves its clients, and checks that a process does."""

from __future__ import annotations

import time

from tracer import procfs

from .config import ClusterConfig, ConfigError, NodeConfig


class ServerAddress:
    """The configured ``node.server`` port on its host, on the VIP, or on a wildcard address."""

    def __init__(self, cluster: ClusterConfig, me: NodeConfig) -> None:
        self.cluster = cluster
        self.me = me

    def serves(self, local: str) -> bool:
        """Whether clients of ``node.server`` (or of the VIP) reach a listener on ``local``."""
        host, _, port = local.rpartition(":")
        if int(port) != self.me.server_port:
            return False
        wanted = {self.me.server_host.strip("[]"), "0.0.0.0", "::"}
        if self.cluster.vip:
            wanted.add(self.cluster.vip.split("/")[0])
        return host.strip("[]") in wanted

    def listening(self, pid: int) -> bool:
        return any(self.serves(a) for a in procfs.listening_addresses(pid))

    def listen_fds(self, pid: int) -> set[int]:
        """The process's listening sockets that serve clients: accepts on others are not inputs."""
        return {fd for fd, s in procfs.tcp_fds(pid).items()
                if s.state == procfs.TCP_LISTEN and self.serves(s.local)}

    def check(self, pid: int) -> None:
        """Refuse a process that does not listen where the configuration says (ConfigError)."""
        if not procfs.exists(pid):
            return  # the tracer's own check gives the clear error
        if not self.listening(pid):
            found = ", ".join(procfs.listening_addresses(pid)) or "nothing"
            raise ConfigError(f"{self.cluster.path}: node {self.me.name!r}.server: pid {pid} "
                              f"does not listen on {self.me.server} (it listens on {found})")

    def wait(self, pid: int, timeout: float = 30.0) -> None:
        """Wait for a launched server to listen (ConfigError if it exits or takes too long)."""
        deadline = time.monotonic() + timeout
        while not self.listening(pid):
            if time.monotonic() > deadline or not procfs.exists(pid):
                raise ConfigError(f"{self.cluster.path}: node {self.me.name!r}.server: the command "
                                  f"did not listen on {self.me.server} within {timeout:.0f}s")
            time.sleep(0.05)
