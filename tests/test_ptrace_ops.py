"""Reading and writing another process's memory, on a real process."""

import errno
import itertools
import subprocess
import time

import pytest

from tracer.ptrace_ops import read_memory, write_memory


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)  # past exec, so the mappings are sleep's
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _writable_end_before_a_gap(pid: int) -> int:
    """The end of a writable mapping that no mapping follows directly."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            regions.append((start, end, perms))
    for (_, end, perms), (next_start, _, _) in itertools.pairwise(regions):
        if perms.startswith("rw") and next_start > end:
            return end
    raise AssertionError(f"no writable mapping before a gap in /proc/{pid}/maps")


def test_bytes_written_into_another_process_read_back_the_same(sleeper):
    end = _writable_end_before_a_gap(sleeper)
    write_memory(sleeper, end - 8, b"12345678")
    assert read_memory(sleeper, end - 8, 8) == b"12345678"


def test_a_write_that_runs_past_a_mapping_raises_efault_and_names_how_much_it_wrote(sleeper):
    end = _writable_end_before_a_gap(sleeper)
    write_memory(sleeper, end - 4, b"....")
    with pytest.raises(OSError) as raised:
        write_memory(sleeper, end - 2, b"wxyz")
    assert raised.value.errno == errno.EFAULT
    assert "wrote only 2 bytes" in str(raised.value)
    assert read_memory(sleeper, end - 4, 8) == b"..wx"  # a read stops at the gap too


def test_reading_a_process_that_is_gone_raises_esrch():
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OSError) as raised:
        read_memory(proc.pid, 0x1000, 8)
    assert raised.value.errno == errno.ESRCH
