"""A small tmpfs mounted over a directory, and a ballast file that fills it: a data_dir whose
disk runs full, for real, at the moment a test picks."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_disk(directory: Path, megabytes: int) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs",
                    str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file into ``directory`` until its file system has no byte left."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return ballast


@contextlib.contextmanager
def device_that_runs_out(directory: Path, device_mb: int = 256, room_mb: int = 4) -> Iterator[Path]:
    """An ext4 file system of ``device_mb`` mounted at ``directory``, on a loop device whose
    backing file lives on a tmpfs with only ``room_mb`` left once the file system's own blocks
    are written: writes reach the page cache as on any disk with room, and fail only when
    written back, so it is an fsync that reports them."""
    backing = directory.with_name(directory.name + "-backing")
    backing.mkdir(parents=True)
    directory.mkdir(parents=True, exist_ok=True)
    loop = ""
    with small_disk(backing, device_mb):
        image = backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(device_mb << 20)
        try:
            loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            # inode tables and journal written now, not by a kernel thread after the mount
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                            loop], check=True, capture_output=True)
            subprocess.run(["mount", loop, str(directory)], check=True)
            try:
                subprocess.run(["sync", "--file-system", str(directory)], check=True)
                used = os.stat(image).st_blocks * 512
                subprocess.run(["mount", "-o", f"remount,size={used + (room_mb << 20)}",
                                str(backing)], check=True)
                yield directory
            finally:
                subprocess.run(["umount", "--lazy", str(directory)], check=False)
        finally:
            if loop:
                subprocess.run(["losetup", "--detach", loop], check=False)
