"""Hosts in network namespaces for multi-host tests (pyroute2).

    with Hosts(3) as hosts:
        hosts[0].addr                      # "10.77.0.1"
        hosts[1].run(["ping", "-c1", hosts[0].addr])
        p = hosts[2].popen([sys.executable, "server.py"])
        hosts.link_down(1); hosts.link_up(1)   # partition host 1 and heal it
        hosts.block(0, 2); hosts.unblock_all()  # drop what host 0 sends host 2; let all through again

Each host is a namespace with ``lo`` and ``eth0`` (address ``<subnet>.<i+1>/24``); every ``eth0``
is one end of a veth pair whose other end sits on a bridge in a private hub namespace, so nothing
is added to the root namespace and several ``Hosts`` (of concurrent tests) never collide even with
the same subnet. Everything is removed on exit, also when the body fails; namespaces left by a
killed test run (their creator pid is dead) are removed by the next ``Hosts``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence

from pyroute2 import NetNS, netns

PREFIX = "rnh"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _names() -> list[str]:
    try:
        return list(netns.listnetns())
    except OSError:
        return []


def janitor() -> None:
    """Remove namespaces of dead test runs (name ``rnh<pid>-...``)."""
    for name in _names():
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(Exception):
                netns.remove(name)


class Host:
    """One host: a network namespace with an address on the shared segment."""

    def __init__(self, index: int, name: str, addr: str) -> None:
        self.index = index
        self.name = name
        self.addr = addr

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv), timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def __repr__(self) -> str:
        return f"Host({self.index}, {self.name}, {self.addr})"


class Hosts:
    """``n`` hosts joined by a bridge in a hub namespace; a context manager."""

    def __init__(self, n: int, subnet: str = "10.77.0") -> None:
        if not 1 <= n <= 200:
            raise ValueError("between 1 and 200 hosts")
        janitor()
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}"
        self.hub = f"{self.tag}-hub"
        self.hosts = [Host(i, f"{self.tag}-{i}", f"{subnet}.{i + 1}") for i in range(n)]
        self._created: list[str] = []
        self._filtered: set[int] = set()  # hosts with a table of dropped sources
        try:
            self._build(subnet)
        except BaseException:
            self.close()
            raise

    def _build(self, subnet: str) -> None:
        netns.create(self.hub)
        self._created.append(self.hub)
        with NetNS(self.hub) as hub:
            hub.link("add", ifname="br0", kind="bridge")
            br = hub.link_lookup(ifname="br0")[0]
            hub.link("set", index=br, state="up")
            for h in self.hosts:
                netns.create(h.name)
                self._created.append(h.name)
                port = f"p{h.index}"
                hub.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": h.name})
                idx = hub.link_lookup(ifname=port)[0]
                hub.link("set", index=idx, master=br)
                hub.link("set", index=idx, state="up")
                with NetNS(h.name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                    eth = ns.link_lookup(ifname="eth0")[0]
                    ns.addr("add", index=eth, address=h.addr, prefixlen=24)
                    ns.link("set", index=eth, state="up")

    def _port(self, i: int, state: str) -> None:
        with NetNS(self.hub) as hub:
            hub.link("set", index=hub.link_lookup(ifname=f"p{i}")[0], state=state)

    def link_down(self, i: int) -> None:
        """Cut host ``i`` off the segment (its own link stays up: packets just vanish)."""
        self._port(i, "down")

    def link_up(self, i: int) -> None:
        self._port(i, "up")

    def block(self, src: int, dst: int) -> None:
        """Drop every IPv4 packet host ``src`` sends host ``dst``, on arrival (``src`` sends as if
        nothing were wrong; the other way is untouched: call it twice for a cut between them).
        An nftables rule in ``dst``'s namespace; ARP still passes, as behind a firewall."""
        host = self.hosts[dst]
        if dst not in self._filtered:
            self._nft(host, "add table ip partition\n"
                            "add chain ip partition input { type filter hook input priority 0 ; }\n")
            self._filtered.add(dst)
        self._nft(host, f"add rule ip partition input ip saddr {self.hosts[src].addr} drop\n")

    def unblock_all(self) -> None:
        for dst in sorted(self._filtered):
            self._nft(self.hosts[dst], "delete table ip partition\n")
        self._filtered.clear()

    @staticmethod
    def _nft(host: Host, script: str) -> None:
        result = host.run(["nft", "-f", "-"], input=script, timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"nft in {host.name}: {result.stderr.strip()}")

    def close(self) -> None:
        for name in reversed(self._created):
            with contextlib.suppress(Exception):
                netns.remove(name)
        self._created = []

    @property
    def addrs(self) -> list[str]:
        return [h.addr for h in self.hosts]

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)
