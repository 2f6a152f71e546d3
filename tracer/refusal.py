"""Taking back a held input: the stopped thread's syscall is made to fail, and a refused accept's
new descriptor is closed by the thread itself (x86_64).

A held thread stops on its way back to user space, right after the syscall, with the result in
``rax``. Unless a signal with a handler was queued in the same instant: signals are taken lowest
number first and the gate's SIGSTOP is 19, so the kernel may build that handler's frame first.
The thread then stops at the handler's entry and the syscall's result waits in the frame, where
``sigreturn`` will restore it from; it is rewritten there.

A syscall is run in the thread by pointing it at the ``syscall`` instruction its held syscall
came from and single-stepping it; its registers are put back afterwards. Nothing is added to the
process: the only memory written is a result in a frame the kernel built.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from ptrace.binding import func as pt

from .ptrace_ops import (
    esrch_means_gone,
    get_sigmask,
    read_memory,
    request,
    set_sigmask,
    wait_tid,
    write_memory,
)

SYSCALL_INSN = b"\x0f\x05"
SYS_CLOSE = 3
_WORD = 0xFFFFFFFFFFFFFFFF
# struct rt_sigframe at a handler's entry: rsp -> pretcode, then struct ucontext (uc_flags,
# uc_link, uc_stack of 24 bytes, then uc_mcontext: struct sigcontext, whose registers run r8..r15,
# rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip). The kernel passes &frame->uc in rdx.
_UC_MCONTEXT = 40
_SC_RDX, _SC_RAX, _SC_RSP, _SC_RIP = 12 * 8, 13 * 8, 15 * 8, 16 * 8
MAX_FRAMES = 8
_ALL_BUT_SIGTRAP = _WORD & ~(1 << (signal.SIGTRAP - 1))


class InjectFailed(Exception):
    """The thread did not run the injected syscall: ``status`` is the wait status it reported
    instead (it ended, or another stop came first), which belongs to the tracer's loop."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class HeldSyscall:
    """Where a held thread's syscall came from, and where its result waits."""

    insn: int  # address of the `syscall` instruction it ran
    frame_rax: int | None  # the result's address in a signal frame; None: in the rax register


def _word(pid: int, address: int) -> int:
    return int.from_bytes(read_memory(pid, address, 8), "little")


def locate(tid: int, pid: int, result: int) -> HeldSyscall | None:
    """Find the held syscall that returned ``result``: right behind the thread, or saved in the
    frame of the signal handler the thread stopped at the entry of (or, handlers entered one on
    top of another, in the frame of the first). None when it is none of these."""
    with esrch_means_gone(tid):
        regs = pt.ptrace_getregs(tid)
    rip, rsp, rdx, rax = regs.rip, regs.rsp, regs.rdx, regs.rax
    frame_rax = None
    try:
        for _ in range(MAX_FRAMES + 1):
            if rax == result & _WORD and read_memory(pid, rip - 2, 2) == SYSCALL_INSN:
                return HeldSyscall(rip - 2, frame_rax)
            if rdx != rsp + 8:  # not a handler's entry
                return None
            context = rdx + _UC_MCONTEXT
            frame_rax = context + _SC_RAX
            rip, rsp, rdx, rax = (_word(pid, context + at) for at in (_SC_RIP, _SC_RSP, _SC_RDX, _SC_RAX))
    except OSError:
        return None
    return None


def set_result(tid: int, pid: int, held: HeldSyscall, value: int) -> None:
    """Make the held syscall return ``value`` (a negative errno to fail it)."""
    if held.frame_rax is None:
        with esrch_means_gone(tid):
            regs = pt.ptrace_getregs(tid)
            regs.rax = value & _WORD
            pt.ptrace_setregs(tid, regs)
        return
    write_memory(pid, held.frame_rax, (value & _WORD).to_bytes(8, "little"))


def run_syscall(tid: int, held: HeldSyscall, nr: int, arg0: int) -> int:
    """Make the stopped thread run ``nr(arg0)`` through the instruction its held syscall ran,
    single-stepped, then put its registers back as they were. Returns what the syscall returned.

    Every signal but SIGTRAP is blocked for the step: one queued meanwhile (a handler's signal
    sent in the same instant as the input, say) waits until the thread goes on, instead of being
    taken before the step. SIGTRAP stays unblocked because the step's own trap is forced: the
    kernel would reset a blocked SIGTRAP's handler to the default. Raises InjectFailed if another
    stop comes first all the same (SIGSTOP cannot be blocked); the registers and the signal mask
    are put back then too."""
    with esrch_means_gone(tid):
        regs = pt.ptrace_getregs(tid)
    saved = type(regs).from_buffer_copy(regs)
    regs.rax = nr
    regs.orig_rax = _WORD  # not in a syscall: no restart logic on resuming
    regs.rdi = arg0 & _WORD
    regs.rip = held.insn
    blocked = get_sigmask(tid)
    with esrch_means_gone(tid):
        pt.ptrace_setregs(tid, regs)
        set_sigmask(tid, _ALL_BUT_SIGTRAP)
        request(pt.PTRACE_SINGLESTEP, tid)
        _, status = wait_tid(tid, nohang=False)
        if not os.WIFSTOPPED(status):
            raise InjectFailed("the thread ended", status)
        stepped = os.WSTOPSIG(status) == signal.SIGTRAP and status >> 16 == 0
        got = pt.ptrace_getregs(tid).rax if stepped else 0
        pt.ptrace_setregs(tid, saved)
        set_sigmask(tid, blocked)
    if not stepped:
        raise InjectFailed(f"another stop came first (wait status {status:#x})", status)
    return got - (1 << 64) if got >= 1 << 63 else got
