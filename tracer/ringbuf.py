"""Reads a BPF ring buffer map straight from its memory mapping.

libbpf's reader calls back into Python once per record through ctypes, which cost the tracer
more CPU per event than everything else it does with the event. This reader maps the ring as
libbpf does (kernel/bpf/ringbuf.c: a consumer page we write, then the producer page and the data
pages mapped twice so that a record never wraps) and hands back a batch of records as bytes.

Python cannot issue memory barriers, so the ordering the ring relies on (record header before
its data, producer position before both) is x86-64's: loads are not reordered with other loads.
On other machines the tracer uses libbpf's reader instead (``supported()``).
"""

from __future__ import annotations

import mmap
import platform
import struct

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_POS = struct.Struct("=Q")
_LEN = struct.Struct("=I")


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


class RingReader:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map; ``fd`` polls readable when records wait."""

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

    def read(self) -> list[bytes]:
        """Take every committed record (up to the first one still being written)."""
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        out: list[bytes] = []
        data, mask, consumer = self._data, self._mask, self._consumer
        while cons < prod:
            at = cons & mask
            length = _LEN.unpack_from(data, at)[0]
            if length & BUSY:
                break
            if not length & DISCARD:
                out.append(bytes(data[at + HEADER:at + HEADER + length]))
            cons += ((length & ~DISCARD) + HEADER + 7) & ~7
            # Published per record, as libbpf does: a producer that commits the record we stop at
            # wakes us only if it sees that we consumed everything before it.
            _POS.pack_into(consumer, 0, cons)
        return out

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()
