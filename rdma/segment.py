"""POSIX shared-memory segments for the shm provider, leak-free even after kill -9.

A segment is created as ``/dev/shm/rdma-<pid>-<n>-<random>`` with O_EXCL and mode 0600 and is
unlinked at once: only its file descriptor keeps it alive. A peer maps it by opening
``/proc/<owner pid>/fd/<fd>``, which the kernel allows only to the owner's uid (the same access
check that mode 0600 expresses); the peer verifies the inode it got. When every process that holds
the fd or a mapping is gone (closed, exited or killed) the kernel frees the memory, and nothing is
ever left in /dev/shm. The only window, a crash between create and unlink, is closed by
``janitor()``: it removes ``rdma-<pid>-*`` names whose pid is dead, and runs at every context open.
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
import stat
from dataclasses import dataclass

from .verbs import VerbsError

SHM_DIR = "/dev/shm"
PREFIX = "rdma-"
_counter = itertools.count()


@dataclass
class Segment:
    fd: int
    mm: mmap.mmap
    size: int
    ino: int

    def ref(self) -> list[int]:
        """What a peer needs to map it (with our pid): [fd, inode, size]."""
        return [self.fd, self.ino, self.size]

    def close_fd(self) -> None:
        """Stop peers from mapping it; existing mappings (ours and theirs) stay valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create(size: int) -> Segment:
    name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.unlink(path)
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        return Segment(fd, mm, size, os.fstat(fd).st_ino)
    except BaseException:
        os.close(fd)
        raise


def _shm_dev() -> int:
    return os.stat(SHM_DIR).st_dev


def open_peer(pid: int, ref: list[int]) -> mmap.mmap:
    """Map a peer's segment given its pid and ``Segment.ref()``; checks it is that very segment."""
    try:
        fd_num, ino, size = (int(x) for x in ref)
    except (TypeError, ValueError) as e:
        raise VerbsError(f"malformed segment reference {ref!r}") from e
    try:
        fd = os.open(f"/proc/{int(pid)}/fd/{fd_num}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VerbsError(f"cannot open shared segment of pid {pid} (fd {fd_num}): {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or st.st_dev != _shm_dev() or st.st_size < size:
            raise VerbsError(f"pid {pid} fd {fd_num} is not the advertised shared segment")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def janitor() -> list[str]:
    """Unlink segments left by dead processes (crash between create and unlink)."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed
