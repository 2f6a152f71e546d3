"""The log store on a disk that runs full: it fails once, loudly, writes nothing after, and the
log reopens as a valid prefix of what was appended."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from consensus import codec
from consensus.codec import Entry
from consensus.errors import LogDirInUse, LogWriteError
from consensus.logstore import LogStore

from .small_disk import device_that_runs_out, fill, small_disk


def _batches(count: int, size: int = 3000) -> list[list[Entry]]:
    return [[Entry(10 * b + k + 1, 3, codec.KIND_DATA, os.urandom(size)) for k in range(10)]
            for b in range(count)]


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted((directory / "log").iterdir())}


@pytest.mark.parametrize("fsync", [True, False])
def test_a_store_whose_disk_fills_fails_once_writes_nothing_after_and_reopens_as_a_prefix(
        tmp_path: Path, fsync: bool) -> None:
    with small_disk(tmp_path / "data", megabytes=2) as data:
        failures: list[LogWriteError] = []
        store = LogStore(data, fsync=fsync, segment_bytes=256 << 10, on_failure=failures.append)
        appended: list[Entry] = []
        durable = 0
        with pytest.raises(LogWriteError, match="No space left on device") as raised:
            for batch in _batches(200):  # 6 MB of records for a disk of 2 MB
                store.append(batch)
                appended += batch
                durable = store.sync()
        assert failures == [raised.value] and store.failed is raised.value
        assert str(data) in str(raised.value)

        on_disk = _files(data)
        for write in (lambda: store.append(_batches(1)[0]), store.sync, store.flush,
                      lambda: store.save_promise(9), lambda: store.truncate_from(1)):
            with pytest.raises(LogWriteError) as again:
                write()
            assert again.value is raised.value
        store.close()  # writes nothing either, and does not raise
        assert _files(data) == on_disk and failures == [raised.value]

        reopened = LogStore(data, fsync=fsync)  # its torn tail is cut
        assert durable <= reopened.last_index <= len(appended)
        assert reopened.entries(1, reopened.last_index, 1 << 30) == appended[:reopened.last_index]
        reopened.close()


def test_a_store_on_a_read_only_disk_says_where_it_cannot_write(tmp_path: Path) -> None:
    with small_disk(tmp_path / "data", megabytes=1) as data:
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        with pytest.raises(LogWriteError, match=f"cannot write the log in {data}/node: Read-only"):
            LogStore(data / "node", fsync=True)


def test_a_promise_the_disk_refuses_is_neither_kept_nor_taken_for_made(tmp_path: Path) -> None:
    with small_disk(tmp_path / "data", megabytes=1) as data:
        store = LogStore(data, fsync=True)
        store.save_promise(5)
        fill(data)
        with pytest.raises(LogWriteError, match="No space left on device"):
            store.save_promise(6)
        assert store.promised == 5
        store.close()
        (data / "ballast").unlink()
        reopened = LogStore(data, fsync=True)  # beside the promise.tmp the failed write left
        assert reopened.promised == 5
        reopened.save_promise(7)
        reopened.close()
        again = LogStore(data, fsync=True)
        assert again.promised == 7
        again.close()


def test_a_store_whose_fsync_fails_stops_there_and_counts_only_what_was_synced(tmp_path: Path) -> None:
    """The device under the file system runs out: every write reaches the page cache, and the
    fsync that would write it back fails. Nothing after counts as durable, nothing is retried."""
    with device_that_runs_out(tmp_path / "data") as data:
        failures: list[LogWriteError] = []
        store = LogStore(data / "node", fsync=True, on_failure=failures.append)
        synced, failed_in = 0, ""
        with pytest.raises(LogWriteError) as raised:
            for batch in _batches(400):  # 12 MB for 4 MiB of room under a 256 MiB file system
                failed_in = "write"
                store.append(batch)
                failed_in = "fsync"
                synced = store.sync()
        assert failed_in == "fsync" and synced > 0
        assert failures == [raised.value] and store.durable_index == synced
        with pytest.raises(LogWriteError) as again:
            store.sync()
        assert again.value is raised.value
        store.close()


def test_a_log_directory_serves_one_store_at_a_time_and_names_its_holder(tmp_path: Path) -> None:
    store = LogStore(tmp_path, fsync=False)
    with pytest.raises(LogDirInUse, match=f"{tmp_path} is in use by another process"):
        LogStore(tmp_path, fsync=False)
    holder = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from consensus.logstore import "
         "LogStore; LogStore(Path(sys.argv[1]), fsync=False)", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert f"(pid {os.getpid()})" in holder.stderr, holder.stderr
    store.close()
    LogStore(tmp_path, fsync=False).close()  # free again
