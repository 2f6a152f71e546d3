"""Choosing and opening a provider, and reading the cluster secret."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable

from .verbs import Context


class SecretFileError(ValueError):
    """The cluster secret file is missing, empty or readable by others."""


def read_secret(path: str) -> bytes:
    """The cluster secret; refuses a file that others can read or that is empty."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SecretFileError(f"cluster secret file {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"cluster secret file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise SecretFileError(
            f"cluster secret file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
            "it must be 0600 or stricter (chmod 600)"
        )
    with open(path, "rb") as f:
        data = f.read().strip()
    if not data:
        raise SecretFileError(f"cluster secret file {path}: empty")
    return data


def rdma_devices() -> list[str]:
    """Names of the RDMA devices that ibverbs lists (what ``ibv_devices`` prints)."""
    try:
        from pyverbs.device import get_device_list

        return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in get_device_list()]
    except Exception:  # no pyverbs, no kernel support (ENOSYS), no devices
        return []


def is_local_host(host: str) -> bool:
    """True when ``host`` (optionally host:port) names an address of this machine/namespace."""
    if host.count(":") == 1 or host.startswith("["):
        host = host.rpartition(":")[0] or host
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # only the address is checked: no port is taken (there may be none free)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                s.bind((addr[0], 0))
            except OSError:
                return False
    return bool(infos)


def open_context(provider: str = "auto", peer_hosts: Iterable[str] = ()) -> Context:
    """Open a device: ``verbs``, ``shm``, ``tcp`` or ``auto`` (verbs if a device exists, else shm
    when every peer host is local, else tcp)."""
    if provider == "auto":
        if rdma_devices():
            provider = "verbs"
        elif all(is_local_host(h) for h in peer_hosts):
            provider = "shm"
        else:
            provider = "tcp"
    if provider == "shm":
        from .shm import ShmContext

        return ShmContext()
    if provider == "tcp":
        from .tcp import TcpContext

        return TcpContext()
    if provider == "verbs":
        from .verbs_provider import VerbsContext

        return VerbsContext()
    raise ValueError(f"unknown rdma provider {provider!r} (expected verbs, shm, tcp or auto)")
