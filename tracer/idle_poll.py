"""Idle CPUs that poll instead of halting, while a tracer's held inputs flow, or a follower
catches up (its tracer's batched wake-ups).

Each held input costs two cross-CPU wake-ups: the held thread's stop wakes the tracer, its
continue wakes the thread. A follower catching up wakes its server with each input it replays,
and the server wakes it back by reading it. On a VM whose idle CPUs halt, waking a halted CPU is
an exit to the hypervisor and back, tens of microseconds. A PM QoS request of 0 µs on
/dev/cpu_dma_latency keeps idle CPUs in their polling state while the file stays open; the
kernel drops the request when its holder exits, however it exits. The price: the machine's idle
CPUs spin while it is held, so it is held only from a held input (or a batch of a catch-up's
events) until LINGER_SECONDS pass without one (each change of the request wakes every idle CPU,
so it is not dropped between the inputs of a busy spell).
"""

from __future__ import annotations

import logging
import os
import struct
import threading

log = logging.getLogger("tracer.idle_poll")
DEVICE = "/dev/cpu_dma_latency"
CPUIDLE_GOVERNOR = "/sys/devices/system/cpu/cpuidle/current_governor"
HALT_POLL_NS = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
HALT_POLL_DEFAULT_NS = 200_000  # the kernel's default window for guest_halt_poll_ns
LINGER_SECONDS = 0.05


def halt_poll_ns() -> int | None:
    """How long an idle vCPU polls before it halts, under the haltpoll governor of a KVM guest
    (cpuidle-haltpoll; the kernel's default is 200,000 ns, and it shrinks the window for a CPU
    whose idle spells run longer). None when idle CPUs are governed otherwise. At 0 every idle
    CPU halts at once, and each held input's two cross-CPU wake-ups exit to the hypervisor."""
    try:
        with open(CPUIDLE_GOVERNOR) as governor:
            if governor.read().strip() != "haltpoll":
                return None
        with open(HALT_POLL_NS) as window:
            return int(window.read())
    except (OSError, ValueError):
        return None


def current_limit_us(device: str = DEVICE) -> int:
    """The machine's wake-up latency limit in µs: the smallest request of all its holders."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


class IdlePolling:
    """One PM QoS request of 0 µs, held from ``busy()`` until ``expire()`` finds LINGER_SECONDS
    gone by since the last ``busy()``; ``busy()`` holds it only between ``allow()`` and
    ``forbid()``, which also drops it. Each may be called any number of times."""

    def __init__(self, device: str = DEVICE, linger: float = LINGER_SECONDS) -> None:
        self.device = device
        self.linger = linger
        self._fd: int | None = None
        self._last_busy = 0.0
        self._allowed = False
        self._unavailable = False
        self._lock = threading.Lock()  # the tracer thread and the mode setter both call in

    @property
    def held(self) -> bool:
        return self._fd is not None

    def allow(self) -> None:
        self._allowed = True

    def forbid(self) -> None:
        with self._lock:
            self._allowed = False
            self._release()

    def busy(self, now: float) -> None:
        self._last_busy = now
        if self._fd is None and self._allowed and not self._unavailable:
            self._hold()

    def expire(self, now: float) -> None:
        if self._fd is not None and now - self._last_busy > self.linger:
            with self._lock:
                self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _hold(self) -> None:
        with self._lock:
            if self._fd is not None or not self._allowed:
                return
            fd = -1
            try:
                fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
                os.write(fd, struct.pack("i", 0))
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                self._unavailable = True
                log.warning("cannot keep idle CPUs polling (%s: %s); going on with halting CPUs",
                            self.device, exc.strerror)
                return
            self._fd = fd
