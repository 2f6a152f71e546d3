"""What /proc says about a process: threads, socket fds, TCP state, tracer."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

PF_KTHREAD = 0x00200000
TCP_ESTABLISHED = 1
TCP_LISTEN = 10


@dataclass(frozen=True)
class TcpSocket:
    inode: int
    local: str
    remote: str
    state: int


def exists(pid: int) -> bool:
    return os.path.isdir(f"/proc/{pid}")


# What reading /proc raises for a task that is gone or exiting (a file read can fail with ESRCH)
GONE = (FileNotFoundError, ProcessLookupError)


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (the first is field 3, the state)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].decode().split()


def identity(pid: int) -> str:
    """What names this process and no other, ever: the boot, and its start time in clock ticks
    since boot (a pid alone is reused)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{_stat_fields(pid)[19]}"


def is_kernel_thread(pid: int) -> bool:
    return bool(int(_stat_fields(pid)[6]) & PF_KTHREAD)


def status_field(pid: int, name: str) -> str | None:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    return None


def tracer_pid(pid: int) -> int:
    """The pid tracing ``pid`` (0 when none); a tracer of any of its threads counts."""
    for tid in threads(pid):
        try:
            traced_by = int(status_field(tid, "TracerPid") or 0)
        except GONE:
            continue
        if traced_by:
            return traced_by
    return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def last_cpu(tid: int) -> int | None:
    """The CPU a thread last ran on (field 39 of its stat); None when it is gone."""
    try:
        return int(_stat_fields(tid)[36])
    except (OSError, ValueError, IndexError):
        return None


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except GONE:
        return []


def children(pid: int) -> list[int]:
    """The processes that ``pid``'s threads forked and that have not exited (empty if it is gone)."""
    found: list[int] = []
    for tid in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(k) for k in f.read().split()]
        except GONE:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """The process's children, their children and so on (empty if it is gone)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def socket_holders(pid: int, inode: int) -> list[tuple[int, int]]:
    """(pid, fd) of each descriptor of socket ``inode`` in the processes ``pid`` forked, and
    theirs."""
    found: list[tuple[int, int]] = []
    for child in descendants(pid):
        try:
            found += [(child, fd) for fd, held in socket_fds(child).items() if held == inode]
        except GONE:
            continue
    return found


def pending_signals(tid: int) -> int:
    """The thread's private pending-signal mask (SigPnd)."""
    try:
        return int(status_field(tid, "SigPnd") or "0", 16)
    except GONE:
        return 0


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket the process holds."""
    found: dict[int, int] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[8:-1])
    return found


def _decode_addr(hexaddr: str) -> str:
    ip_hex, port_hex = hexaddr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        return f"{socket.inet_ntoa(struct.pack('<I', struct.unpack('>I', raw)[0]))}:{port}"
    words = struct.unpack("<4I", raw)
    packed = struct.pack(">4I", *words)
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return f"{socket.inet_ntoa(packed[12:])}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, packed)}]:{port}"


def tcp_sockets(pid: int) -> dict[int, TcpSocket]:
    """inode -> TCP socket, from the process's own network namespace."""
    found: dict[int, TcpSocket] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    inode = int(cols[9])
                    if inode:
                        found[inode] = TcpSocket(
                            inode, _decode_addr(cols[1]), _decode_addr(cols[2]), int(cols[3], 16)
                        )
        except GONE:
            continue
    return found


def tcp_fds(pid: int) -> dict[int, TcpSocket]:
    """fd -> TCP socket for the process's TCP sockets (listening and connected)."""
    table = tcp_sockets(pid)
    return {fd: table[inode] for fd, inode in socket_fds(pid).items() if inode in table}


def listening_addresses(pid: int) -> list[str]:
    return sorted({s.local for s in tcp_fds(pid).values() if s.state == TCP_LISTEN})


def socket_inode(pid: int, fd: int) -> int | None:
    """The inode of the socket that descriptor ``fd`` names now: what tells it from a later file
    or socket under the same number. None when the descriptor is not open or not a socket."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def peer_of(pid: int, fd: int) -> str | None:
    inode = socket_inode(pid, fd)
    if inode is None:
        return None
    sock = tcp_sockets(pid).get(inode)
    return sock.remote if sock else None
