"""A disk that can lose power: a FUSE filesystem, kept in memory, that knows what a power cut
would leave of what its files and directories hold.

    python -m tests.power_cut_fs MOUNTPOINT [--seed N] [--capacity-mb N]

serves MOUNTPOINT until it is killed; a line ``off`` on its stdin cuts the power, ``on`` brings
it back (a call made meanwhile fails with EIO: its caller is to be killed). What survives the
cut is what fsync had made durable when it came: a file's bytes as of its last fsync (of the
file), a directory's entries as of its last fsync (of the directory). Bytes appended since a
file's last fsync are lost, or a prefix of them survives, or a prefix's length survives filled
with zeros, as the seed draws for each file (what filesystems leave after a crash: the data
written, part of it, or a size extended over blocks never written). Not drawn: a hole inside
what survives (a later block written, an earlier one not), which the log refuses to guess about
(consensus/segments.py). With a capacity, a write past it fails with ENOSPC, as on a full disk.

:class:`PowerCutDisk` mounts one for a test and cuts its power: while the processes that use it
still run, as power goes in an instant, so what they had written and not yet synced is caught.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import select
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Inode:
    is_dir: bool
    mode: int
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""
    entries: dict[str, Inode] = field(default_factory=dict)
    synced_entries: dict[str, Inode] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)


def cut_power(root: Inode, rng: random.Random) -> None:
    """Leave only what a power cut would: see the module's docstring. (A tree: no hard links.)"""

    def visit(node: Inode) -> None:
        if node.is_dir:
            node.entries = dict(node.synced_entries)
            for child in node.entries.values():
                visit(child)
            return
        synced, now = node.synced, bytes(node.data)
        tail = len(now) - len(synced) if now.startswith(synced) else 0
        kept = rng.randint(0, tail) if tail > 0 else 0
        fate = rng.choice(("lost", "prefix", "zeros")) if kept else "lost"
        if fate == "prefix":
            node.data = bytearray(now[:len(synced) + kept])
        elif fate == "zeros":
            node.data = bytearray(synced + bytes(kept))
        else:
            node.data = bytearray(synced)
        node.synced = bytes(node.data)

    visit(root)


def _bytes_held(node: Inode) -> int:
    return sum(map(_bytes_held, node.entries.values())) if node.is_dir else len(node.data)


def _operations_class():
    import fusepy

    class PowerCutOperations(fusepy.Operations):
        """Every call runs under one mutex, and only while the disk has power: without, it fails
        with EIO at once (a caller blocked on an answer could not even be killed)."""

        use_ns = True

        def __init__(self, root: Inode, capacity: int) -> None:
            self.root = root
            self.capacity = capacity
            self.used = _bytes_held(root)
            self.mutex = threading.Lock()  # not "lock": fusepy would take it for the POSIX-lock call
            self.powered = threading.Event()
            self.powered.set()

        def __call__(self, op, *args):
            with self.mutex:
                if not self.powered.is_set():
                    raise fusepy.FuseOSError(errno.EIO)
                return getattr(self, op)(*args)

        def _resize(self, node: Inode, size: int) -> None:
            grow = size - len(node.data)
            if grow > 0 and self.used + grow > self.capacity:
                raise fusepy.FuseOSError(errno.ENOSPC)
            self.used += grow

        def _lookup(self, path: str) -> Inode:
            node = self.root
            for part in filter(None, path.split("/")):
                if not node.is_dir or part not in node.entries:
                    raise fusepy.FuseOSError(errno.ENOENT)
                node = node.entries[part]
            return node

        def _parent(self, path: str) -> tuple[Inode, str]:
            head, _, name = path.rstrip("/").rpartition("/")
            parent = self._lookup(head or "/")
            if not parent.is_dir:
                raise fusepy.FuseOSError(errno.ENOTDIR)
            return parent, name

        def _add(self, path: str, node: Inode) -> None:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise fusepy.FuseOSError(errno.EEXIST)
            parent.entries[name] = node

        def getattr(self, path, fh=None):
            node = self._lookup(path)
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            return {"st_mode": kind | node.mode, "st_nlink": 2 if node.is_dir else 1,
                    "st_size": len(node.data), "st_uid": os.getuid(), "st_gid": os.getgid(),
                    "st_mtime": node.mtime_ns / 1e9, "st_atime": node.mtime_ns / 1e9,
                    "st_ctime": node.mtime_ns / 1e9}

        def readdir(self, path, fh):
            return [".", "..", *self._lookup(path).entries]

        def mkdir(self, path, mode):
            self._add(path, Inode(is_dir=True, mode=mode & 0o7777))

        def create(self, path, mode, fi=None):
            self._add(path, Inode(is_dir=False, mode=mode & 0o7777))
            return 0

        def open(self, path, flags):
            self._lookup(path)
            return 0

        def read(self, path, size, offset, fh):
            return bytes(self._lookup(path).data[offset:offset + size])

        def write(self, path, data, offset, fh):
            node = self._lookup(path)
            self._resize(node, max(len(node.data), offset + len(data)))
            if offset > len(node.data):
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset:offset + len(data)] = data
            node.mtime_ns = time.time_ns()
            return len(data)

        def truncate(self, path, length, fh=None):
            node = self._lookup(path)
            self._resize(node, length)
            del node.data[length:]
            node.data.extend(bytes(length - len(node.data)))

        def fsync(self, path, datasync, fh):
            node = self._lookup(path)
            node.synced = bytes(node.data)
            return 0

        def fsyncdir(self, path, datasync, fh):
            node = self._lookup(path)
            node.synced_entries = dict(node.entries)
            return 0

        def rename(self, old, new):
            src, old_name = self._parent(old)
            dst, new_name = self._parent(new)
            if old_name not in src.entries:
                raise fusepy.FuseOSError(errno.ENOENT)
            replaced = dst.entries.get(new_name)
            if replaced is not None and not replaced.is_dir:
                self.used -= len(replaced.data)
            dst.entries[new_name] = src.entries.pop(old_name)

        def unlink(self, path):
            parent, name = self._parent(path)
            if name not in parent.entries or parent.entries[name].is_dir:
                raise fusepy.FuseOSError(errno.ENOENT)
            self.used -= len(parent.entries.pop(name).data)

        def rmdir(self, path):
            parent, name = self._parent(path)
            if parent.entries.get(name) is None or parent.entries[name].entries:
                raise fusepy.FuseOSError(errno.ENOTEMPTY)
            del parent.entries[name]

        def chmod(self, path, mode):
            self._lookup(path).mode = mode & 0o7777

        def utimens(self, path, times=None):
            return 0

        def statfs(self, path):
            free = (self.capacity - self.used) // 4096
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": self.capacity // 4096,
                    "f_bfree": free, "f_bavail": free, "f_files": 1 << 16, "f_ffree": 1 << 15,
                    "f_namemax": 255}

    return PowerCutOperations


def _control(ops, rng: random.Random) -> None:
    """Lines on stdin: ``off`` cuts the power (what survives is drawn at that instant; a call
    made from then on fails), ``on`` brings it back; each is answered with itself on stdout."""
    for line in sys.stdin:
        command = line.strip()
        if command == "off":
            with ops.mutex:
                cut_power(ops.root, rng)
                ops.used = _bytes_held(ops.root)
                ops.powered.clear()
        elif command == "on":
            ops.powered.set()
        else:
            continue
        print(command, flush=True)


def main() -> None:
    import fusepy

    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity-mb", type=int, default=4096)
    args = ap.parse_args()
    ops = _operations_class()(Inode(is_dir=True, mode=0o755), args.capacity_mb << 20)
    threading.Thread(target=_control, args=(ops, random.Random(args.seed)), daemon=True).start()
    # nothing cached by the kernel but file pages, which each open of a file drops
    fusepy.FUSE(ops, args.mountpoint, foreground=True, nothreads=False, big_writes=True,
                fsname="powercut", entry_timeout=0, attr_timeout=0, negative_timeout=0)


class PowerCutDisk:
    """One :mod:`tests.power_cut_fs` mounted at ``mountpoint`` (created if need be) while in
    use as a context manager."""

    def __init__(self, mountpoint: Path, seed: int = 0, capacity_mb: int = 4096) -> None:
        self.mountpoint = mountpoint
        self.seed = seed
        self.capacity_mb = capacity_mb
        self.log_path = mountpoint.with_name(mountpoint.name + ".power-cut-fs.log")
        self._proc: subprocess.Popen | None = None

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # a pipe nobody reads would stop it once full
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.power_cut_fs", str(self.mountpoint),
                 "--seed", str(self.seed), "--capacity-mb", str(self.capacity_mb)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"power_cut_fs did not mount {self.mountpoint}: "
                                   f"{self.log_path.read_text()[-2000:] or 'timeout'}")
            time.sleep(0.02)

    def power_off(self) -> None:
        """From now on the disk holds only what survived, and a call fails with EIO; kill
        whatever uses it, then :meth:`power_on`. (The mount stays: copies of it in the mount
        namespaces that `ip netns exec` makes would keep an unmounted one alive.)"""
        self._tell("off")

    def power_on(self) -> None:
        self._tell("on")

    def _tell(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command.encode() + b"\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], 30)
        answer = self._proc.stdout.readline().decode().strip() if ready else "nothing"
        assert answer == command, f"power_cut_fs at {self.mountpoint}: {command!r} answered {answer!r}"

    def close(self) -> None:
        if self._proc is not None:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            self._proc.kill()  # the kernel ends the connection, also for copies of the mount
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> PowerCutDisk:
        self.mount()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def power_cut_disks(directories: list[Path], stop_users: Callable[[], None]) -> Iterator[list[PowerCutDisk]]:
    """A :class:`PowerCutDisk` mounted on each directory (its daemon's log beside it); on the way
    out, ``stop_users`` first (a disk in use unmounts only lazily), then every disk is unmounted."""
    disks = [PowerCutDisk(d, seed=k) for k, d in enumerate(directories)]
    try:
        for disk in disks:
            disk.mount()
        yield disks
    finally:
        try:
            stop_users()
        finally:
            for disk in disks:
                disk.close()


if __name__ == "__main__":
    main()
