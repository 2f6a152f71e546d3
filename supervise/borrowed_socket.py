"""A server's own socket, seen from the supervisor: a duplicate of its descriptor
(pidfd_getfd), which is the same socket, not a copy."""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import termios

log = logging.getLogger("supervise")

_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)
# struct tcp_info: tcpi_bytes_received (bytes that arrived in order, since Linux 4.1)
_TCP_INFO_LEN = 136
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_OFFSET = 128


def borrow_socket(pid: int, fd: int, inode: int | None = None) -> socket.socket | None:
    """Descriptor ``fd`` of process ``pid`` as a socket of ours; None (logged) when it cannot be
    taken: the process is gone, the descriptor is not open or not a socket, or (given ``inode``,
    from tracer.procfs.socket_inode) it names another file now (the server closed the one it was,
    and opened another since)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        log.warning("cannot reach the server (pid %d) for its fd %d: %s", pid, fd, exc.strerror)
        return None
    try:
        dup = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            error = ctypes.get_errno()
            # EBADF: the server closed it already (a forking server's parent, say)
            (log.debug if error == errno.EBADF else log.warning)(
                "cannot take fd %d of the server (pid %d): %s", fd, pid, os.strerror(error))
            return None
    finally:
        os.close(pidfd)
    if inode is not None and os.fstat(dup).st_ino != inode:
        os.close(dup)
        log.info("fd %d of the server (pid %d) names another file now: its socket is closed", fd, pid)
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError as exc:
        os.close(dup)
        log.warning("fd %d of the server (pid %d) is not a socket: %s", fd, pid, exc.strerror)
        return None


def bytes_read(sock: socket.socket) -> int:
    """How many bytes the owner of this TCP socket has read from it so far: what arrived, less
    what still waits to be read. Arrival is counted first, so a segment landing in between can
    only make the figure smaller than the truth, never larger."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    received = _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFFSET)[0]
    waiting = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
    return received - waiting[0]
