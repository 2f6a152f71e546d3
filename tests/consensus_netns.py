"""Network namespaces as hosts for the consensus tcp tests: one namespace per replica, all joined
by veth pairs to a bridge in a hub namespace. ``down(i)``/``up(i)`` cut and restore host i's
link (a partition). Removed on ``close`` (and by ``janitor`` for leftovers of killed runs).

(A local helper: the shared tests/netns.py did not exist when these tests were written.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess

PREFIX = "cns"


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=20)


def janitor() -> None:
    """Delete namespaces left by test runs whose process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and "-" in name:
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _ip("netns", "del", name, check=False)


class Hosts:
    def __init__(self, n: int, subnet: str = "10.77.0") -> None:
        janitor()
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(2).hex()}"
        self.hub = f"{self.tag}-hub"
        self.names = [f"{self.tag}-h{i}" for i in range(n)]
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                    "netns", self.hub)
                _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.hub, "link", "set", f"p{i}", "up")
        except Exception:
            self.close()
            raise

    def down(self, i: int) -> None:
        _ip("-n", self.hub, "link", "set", f"p{i}", "down")

    def up(self, i: int) -> None:
        _ip("-n", self.hub, "link", "set", f"p{i}", "up")

    def close(self) -> None:
        for ns in [*self.names, self.hub]:
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns, check=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
