"""`supervise doctor`: one table of what this machine has and lacks for supervision."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    mark: str = ""  # shown instead of ok / MISSING / absent


def _kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, f"euid {os.geteuid()}", "run supervise as root (ptrace and BPF need it)")


def check_kernel() -> Check:
    ok = _kernel_version() >= (5, 15)
    return Check("kernel", ok, platform.release(),
                 "a kernel >= 5.15 is needed (BPF ring buffer; bpf_task_pt_regs, which the probes "
                 "read syscall arguments with)")


def check_tracefs() -> Check:
    ok = os.path.isdir("/sys/kernel/tracing/events/syscalls")
    return Check(
        "tracefs", ok, "/sys/kernel/tracing" if ok else "not mounted",
        "mount -t tracefs nodev /sys/kernel/tracing",
    )


def check_btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("BTF", ok, "/sys/kernel/btf/vmlinux" if ok else "absent",
                 "a kernel built with CONFIG_DEBUG_INFO_BTF (the probes find the current task's "
                 "saved registers through it)")


def check_bcc() -> Check:
    try:
        import bcc
    except ImportError as exc:
        return Check("bcc", False, str(exc),
                     "apt-get install python3-bpfcc bpfcc-tools; use a venv with --system-site-packages")
    return Check("bcc", True, os.path.dirname(bcc.__file__))


def check_headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    ok = (build / "include").is_dir()
    detail = f"{build} -> {build.resolve()}" if ok else f"{build} missing"
    return Check("kernel headers", ok, detail,
                 "make setup (links Debian's linux-headers-amd64 tree when no exact package exists)")


def check_compile() -> Check:
    if os.geteuid() != 0:
        return Check("tracepoint program", False, "needs root", "run as root")
    from tracer.probes import ProbeError, Probes

    try:
        Probes(snaplen=64).close()
    except ProbeError as exc:
        return Check("tracepoint program", False, str(exc).splitlines()[0][:120],
                     "fix the items above (bcc, headers, tracefs)")
    return Check("tracepoint program", True, "tracer/bpf/sockets.c compiled, verified, attached")


def check_send_signal() -> Check:
    ok = _kernel_version() >= (5, 6)
    detail = "bpf_send_signal_thread (kernel >= 5.6; used by the loaded program)"
    return Check("bpf_send_signal_thread", ok, detail if ok else f"kernel {platform.release()}",
                 "a kernel >= 5.6 is needed to gate syscalls")


def check_yama() -> Check:
    path = Path("/proc/sys/kernel/yama/ptrace_scope")
    if not path.exists():
        return Check("Yama ptrace_scope", True, "Yama not active: no restriction")
    scope = int(path.read_text())
    ok = scope < 3
    return Check("Yama ptrace_scope", ok, f"{scope}",
                 "ptrace_scope 3 forbids attaching; it resets only at reboot")


def check_rdma() -> Check:
    devices = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
    if devices:
        return Check("RDMA devices", True, ", ".join(devices), required=False)
    return Check("RDMA devices", False, "none: the shm and tcp transports will be used",
                 "optional: an RNIC or 'rdma link add rxe0 type rxe netdev eth0'", required=False)


def check_netns() -> Check:
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    ip = shutil.which("ip")
    if ip is None:
        return Check("network namespaces", False, "iproute2 missing", "apt-get install iproute2",
                     required=False)
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return Check("network namespaces", False, made.stderr.strip()[:100],
                     "needed only for the VIP and multi-host tests", required=False)
    subprocess.run([ip, "netns", "del", name], capture_output=True)
    return Check("network namespaces", True, "created and removed one", required=False)


def check_idle_cpus() -> Check:
    """Advice only: gating is correct either way. It keeps idle CPUs polling while inputs are held
    (tracer/idle_poll.py, unless cluster.idle_poll is off); every other wake-up of an idle vCPU,
    a follower's or a client's, is faster with halt-polling (bench/NOTES.md)."""
    from tracer.idle_poll import HALT_POLL_DEFAULT_NS, HALT_POLL_NS, halt_poll_ns

    window = halt_poll_ns()
    if window is None:
        return Check("idle CPUs", True, "not under the haltpoll governor", required=False)
    if window > 0:
        return Check("idle CPUs", True, f"poll up to {window // 1000} µs before they halt (haltpoll)",
                     required=False)
    return Check("idle CPUs", False, "halt at once (haltpoll.guest_halt_poll_ns=0): waking one is an "
                 "exit to the hypervisor; gating keeps them polling only while inputs are held",
                 required=False, mark="slow",
                 fix=f"optional, for faster wake-ups: echo {HALT_POLL_DEFAULT_NS} > {HALT_POLL_NS} "
                     "(the kernel's default: an idle vCPU polls up to 200 µs before it halts)")


def check_breakpoints() -> Check:
    """Optional: cluster.hold = "outputs" sets hardware breakpoints on libc's output functions
    through ptrace (tracer/breakpoints.py). Tried on a child process of this one."""
    from ptrace.error import PtraceError

    from tracer import breakpoints
    from tracer import ptrace_ops as pt

    name, needed = "output breakpoints", 'needed only for cluster.hold = "outputs"'
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while True:  # the dynamic loader maps libc just after exec
            try:
                entries = breakpoints.output_entries(child.pid)
                break
            except breakpoints.NoOutputCalls:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        pt.seize(child.pid, 0)
        pt.interrupt(child.pid)
        os.waitpid(child.pid, pt.WALL)
        breakpoints.load(child.pid, entries)
        breakpoints.switch(child.pid, True)
        breakpoints.switch(child.pid, False)
        pt.detach(child.pid)
    except (OSError, PtraceError, pt.ThreadGone, breakpoints.NoOutputCalls) as exc:
        return Check(name, False, str(exc)[:100], needed, required=False)
    finally:
        child.kill()
        child.wait()
    return Check(name, True, "set and cleared a thread's debug registers at libc's write, writev, "
                 "send and sendmsg", required=False)


CHECKS: list[Callable[[], Check]] = [
    check_root, check_kernel, check_tracefs, check_btf, check_bcc, check_headers, check_compile,
    check_send_signal, check_yama, check_rdma, check_netns, check_idle_cpus, check_breakpoints,
]


def run_doctor(argv: list[str]) -> int:
    if argv:
        print(f"supervise: error: doctor takes no arguments (got {' '.join(argv)})")
        return 2
    results = [check() for check in CHECKS]
    width = max(len(r.name) for r in results)
    for r in results:
        mark = r.mark or ("ok" if r.ok else ("MISSING" if r.required else "absent"))
        print(f"{r.name:<{width}}  {mark:<7}  {r.detail}")
        if not r.ok and r.fix:
            print(f"{'':<{width}}  {'':<7}  fix: {r.fix}")
    missing = [r.name for r in results if r.required and not r.ok]
    if missing:
        print(f"\nnot ready for replication: {', '.join(missing)}")
        return 1
    print("\nready: everything replication needs is here")
    return 0
