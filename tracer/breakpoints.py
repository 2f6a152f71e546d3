"""Hardware breakpoints on a process's output calls, set from outside it through ptrace.

x86_64 has four debug address registers per thread. Each holds the entry of one of libc's output
functions (write, writev, send, sendmsg), and DR7 turns them on and off together: a thread that
calls one of them while they are on stops with SIGTRAP before the syscall is made. Nothing is
written into the process: the registers are the thread's CPU state, kept by the kernel.

The kernel keeps them across PTRACE_DETACH (a thread that reached one afterwards would die of
SIGTRAP), clears them in a new thread or process, and drops them at exec.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

from . import ptrace_ops as pt

OUTPUT_FUNCTIONS = (b"write", b"writev", b"send", b"sendmsg")
PTRACE_POKEUSER = 6
DEBUGREG_OFFSET = 848  # offsetof(struct user, u_debugreg) on x86_64
DR7_ENABLE_ALL = 0b01010101  # L0..L3, each an execute breakpoint of length 1
TRAP_HWBKPT = 4  # si_code of a SIGTRAP raised by a hardware breakpoint
_LIBC = re.compile(r"/libc(\.so\.\d+|-[\d.]+\.so)$")


class NoOutputCalls(Exception):
    """The process has no libc whose output functions can be found."""


def output_entries(pid: int) -> list[int]:
    """The addresses of OUTPUT_FUNCTIONS in ``pid``'s libc."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and _LIBC.search(fields[5]) and int(fields[2], 16) == 0:
                base = int(fields[0].split("-")[0], 16)
                stat = os.stat(fields[5])
                offsets = _function_offsets(fields[5], stat.st_ino, stat.st_mtime_ns)
                return [base + offsets[name] for name in OUTPUT_FUNCTIONS]
    raise NoOutputCalls(f"pid {pid} maps no libc")


@lru_cache(maxsize=8)
def _function_offsets(path: str, _inode: int, _mtime: int) -> dict[bytes, int]:
    from bcc import BPF

    pattern = b"^(" + b"|".join(OUTPUT_FUNCTIONS) + b")$"
    found = dict(BPF.get_user_functions_and_addresses(path.encode(), pattern))
    missing = [n.decode() for n in OUTPUT_FUNCTIONS if n not in found]
    if missing:
        raise NoOutputCalls(f"{path} lacks {', '.join(missing)}")
    return found


def load(tid: int, entries: list[int]) -> None:
    """Put the entries in a stopped thread's address registers (still off)."""
    for i, address in enumerate(entries):
        pt.request(PTRACE_POKEUSER, tid, DEBUGREG_OFFSET + 8 * i, address)


def switch(tid: int, on: bool) -> None:
    """Turn a stopped thread's breakpoints on or off."""
    pt.request(PTRACE_POKEUSER, tid, DEBUGREG_OFFSET + 8 * 7, DR7_ENABLE_ALL if on else 0)
