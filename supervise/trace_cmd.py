"""`supervise --pid PID --trace`: print a process's socket events until interrupted."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from tracer.events import SocketEvent
from tracer.tracer import Mode, Tracer

from .stop_signals import catch_stop_signals


def format_line(event: SocketEvent) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(event.t)) + f".{int(event.t % 1 * 1e6):06d}"
    parts = [
        clock,
        f"{event.pid}/{event.tid}",
        f"{event.dir.label:<3}",
        f"{event.call.syscall}(fd={event.fd}) = {event.ret}",
        f"conn={event.conn}",
    ]
    if event.peer:
        parts.append(f"peer={event.peer}")
    if event.escaped:
        parts.append("ESCAPED")
    if event.data:
        preview = event.data[:64]
        parts.append(repr(preview)[1:] + ("..." if len(event.data) > 64 else ""))
    return " ".join(parts)


class TracePrinter:
    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.broken = threading.Event()

    def __call__(self, event: SocketEvent) -> None:
        if self.broken.is_set():
            return
        line = json.dumps(event.to_json()) if self.as_json else format_line(event)
        try:
            self.out.write(line + "\n")
        except BrokenPipeError:
            self.broken.set()


def run_trace(pid: int | None, command: list[str], as_json: bool, snaplen: int) -> int:
    """Trace until Ctrl-C, SIGTERM, a closed output or the process's exit; returns exit status."""
    sys.stdout.reconfigure(line_buffering=True)
    printer = TracePrinter(sys.stdout, as_json)
    done = threading.Event()
    tracer = Tracer(Mode.OBSERVE, printer, snaplen=snaplen, on_exit=lambda _status: done.set(),
                    background=True)
    if pid is not None:
        tracer.attach(pid)
        target = f"pid {pid}"
    else:
        tracer.launch(command)
        target = f"{command[0]} (pid {tracer.pid})"
    signals = catch_stop_signals()
    # announced only once a signal stops the trace cleanly
    print(f"tracing {target} ({tracer.stats.threads} threads); Ctrl-C to stop", file=sys.stderr)
    while not signals and not done.wait(0.2):
        if printer.broken.is_set() or not tracer.running:
            break
    tracer.detach()
    stats = tracer.stats
    print(
        f"detached from {target}: {stats.events} events, {stats.inputs} inputs, "
        f"{stats.bpf_lost} lost (the tracer runs on idle CPU and drops rather than slow the server)",
        file=sys.stderr,
    )
    return 0
