"""Helpers to run the tracer against a real server from a test."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from tracer import probes
from tracer.events import SocketEvent
from tracer.probes import Probes
from tracer.tracer import Mode, Tracer

_compiled: dict[tuple[int, bool, int], Probes] = {}


def compiled_probes(snaplen: int = 4096, serialize: bool = False) -> Probes:
    """Probes compiled once for the whole run and handed from one test's tracer to the next,
    which resets them when it detaches: compiling takes seconds, most of a tracer test."""
    key = (snaplen, serialize, probes.TGID_SLOTS)
    if key not in _compiled:
        _compiled[key] = Probes(snaplen, serialize)
    return _compiled[key]


def close_compiled_probes() -> None:
    while _compiled:
        _compiled.popitem()[1].close()


class Recorder:
    """Collects events; in gate mode holds them until the test releases them."""

    def __init__(self, auto_release: bool) -> None:
        self.auto_release = auto_release
        self.events: queue.Queue[SocketEvent] = queue.Queue()
        self.seen: list[SocketEvent] = []  # every event, also those next_input passed over
        self.tracer: Tracer | None = None

    def __call__(self, event: SocketEvent) -> None:
        self.seen.append(event)
        self.events.put(event)  # before the release: the reply it lets out may end the test's wait
        if event.gated and self.auto_release:
            assert self.tracer is not None
            self.tracer.release(event)

    def next_input(self, timeout: float = 5.0) -> SocketEvent:
        while True:
            event = self.events.get(timeout=timeout)
            if event.input:
                return event

    def drain(self) -> list[SocketEvent]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


@contextlib.contextmanager
def traced(pid: int, mode: Mode, auto_release: bool = True,
           **options: Any) -> Iterator[tuple[Tracer, Recorder]]:
    recorder = Recorder(auto_release)
    options.setdefault("probes", compiled_probes(options.get("snaplen", 4096),
                                                 options.get("serialize", False)))
    tracer = Tracer(mode, recorder, **options)
    recorder.tracer = tracer
    tracer.attach(pid)
    try:
        yield tracer, recorder
    finally:
        tracer.detach()


def start_trace_cli(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`supervise --trace ...` as a real subprocess; returns once it has attached."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervise", "--trace", *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stderr.readline()
    if not line.startswith("tracing"):
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"tracer did not attach: {line}{err}")
    proc.attached_line = line
    return proc


def stop_trace_cli(proc: subprocess.Popen, timeout: float = 20) -> tuple[str, str]:
    """Interrupt a `supervise --trace` as Ctrl-C does; returns what it wrote (stdout, stderr)."""
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=timeout)
