"""Reads a BPF ring buffer map straight from its memory mapping.

libbpf's reader calls back into Python through ctypes for every record, which is then copied out
through ctypes again. This reader maps the ring as libbpf does (kernel/bpf/ringbuf.c: a consumer
page we write, then the producer page and the data pages, mapped twice so that no record wraps)
and takes records with slices.

Python issues no memory barriers. The ring needs a record's data to be visible before its
header says it is committed, and its header before the producer position that covers it: on
x86-64 loads are not reordered with other loads, which is enough. Elsewhere `supported()` is
False and the tracer keeps libbpf's reader.
"""

from __future__ import annotations

import mmap
import platform
from collections.abc import Callable

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8  # u32 length (with BUSY and DISCARD), u32 page offset
# The space of records read is handed back this often (libbpf: after each), not only at the end
# of a pass, which can be long: the reader runs at SCHED_IDLE and is preempted at any point.
PUBLISH_EVERY = 64


def supported() -> bool:
    return platform.machine() == "x86_64"


class RingReader:
    """The consumer of one BPF_MAP_TYPE_RINGBUF map; ``fd`` polls readable when records wait."""

    def __init__(self, map_fd: int, data_bytes: int) -> None:
        if data_bytes <= 0 or data_bytes & (data_bytes - 1):
            raise ValueError(f"a ring buffer's size is a power of two, not {data_bytes}")
        self.fd = map_fd
        self._mask = data_bytes - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(map_fd, page + 2 * data_bytes, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._data = memoryview(self._producer)[page:]
        # The positions are read and written through views cast to u64, which move each in one
        # aligned load or store. struct.pack_into zeroes its target before it writes: the
        # producer, seeing the consumer position 0 for that instant, takes the ring for full
        # and drops the record it was writing.
        self._consumer_pos = memoryview(self._consumer).cast("Q")
        self._producer_pos = memoryview(self._producer)[:8].cast("Q")
        self._lengths = self._data.cast("I")

    def consume(self, handle: Callable[[memoryview], None]) -> int:
        """Hand every committed record, oldest first, to ``handle`` as a view into the ring
        (valid only during the call), then give their space back; returns how many."""
        data, mask, lengths, consumer_pos = self._data, self._mask, self._lengths, self._consumer_pos
        cons = consumer_pos[0]
        prod = self._producer_pos[0]
        taken = 0
        while cons < prod:
            at = cons & mask
            length = lengths[at >> 2]
            if length & BUSY:
                break
            cons += ((length & ~DISCARD) + HEADER + 7) & ~7
            if not length & DISCARD:
                handle(data[at + HEADER:at + HEADER + length])
                taken += 1
                if not taken % PUBLISH_EVERY:
                    consumer_pos[0] = cons
        consumer_pos[0] = cons
        return taken

    def backlog(self) -> float:
        """The fraction of the ring that holds records not yet read."""
        return (self._producer_pos[0] - self._consumer_pos[0]) / (self._mask + 1)

    def close(self) -> None:
        for view in (self._lengths, self._producer_pos, self._consumer_pos, self._data):
            view.release()
        self._producer.close()
        self._consumer.close()
