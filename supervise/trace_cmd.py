"""`supervise --pid PID --trace`: print a process's socket events until interrupted."""

from __future__ import annotations

import binascii
import sys
import threading
import time
from collections import deque
from typing import TextIO

from tracer.events import Call, Direction, SocketEvent
from tracer.tracer import Mode, Tracer

from .stop_signals import catch_stop_signals

_SYSCALL_NAMES = {call: call.syscall for call in Call}
_DIR_LABELS = {d: d.label for d in Direction}


def format_line(event: SocketEvent) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(event.t)) + f".{int(event.t % 1 * 1e6):06d}"
    parts = [
        clock,
        f"{event.pid}/{event.tid}",
        f"{_DIR_LABELS[event.dir]:<3}",
        f"{_SYSCALL_NAMES[event.call]}(fd={event.fd}) = {event.ret}",
        f"conn={event.conn}",
    ]
    if event.peer:
        parts.append(f"peer={event.peer}")
    if event.escaped:
        parts.append("ESCAPED")
    if not event.last:
        parts.append("(the connection stays open in another descriptor)")
    if event.data:
        preview = event.data[:64]
        parts.append(repr(preview)[1:] + ("..." if len(event.data) > 64 else ""))
    return " ".join(parts)


# The JSON of the fields that a connection's events repeat, before and after "ret", by
# everything it is made of: formatting them was a third of the cost of a line.
_fixed_json: dict[tuple, tuple[str, str]] = {}
FIXED_JSON_KEPT = 1 << 16  # all are dropped when this many are kept (closed connections' too)


def json_line(event: SocketEvent) -> str:
    """One JSON Lines record, formatted directly: every value is a number or a string that needs
    no escaping (syscall names, ip:port, base64), and json.dumps cost more than the rest of
    tracing an event."""
    key = (event.conn, event.tid, event.call, event.fd, event.pid, event.peer, event.dir)
    fixed = _fixed_json.get(key)
    if fixed is None:
        if len(_fixed_json) >= FIXED_JSON_KEPT:
            _fixed_json.clear()
        peer = "null" if event.peer is None else f'"{event.peer}"'
        fixed = _fixed_json[key] = (
            f'"pid": {event.pid}, "tid": {event.tid}, "call": "{_SYSCALL_NAMES[event.call]}", '
            f'"fd": {event.fd}, "ret": ',
            f', "conn": {event.conn}, "peer": {peer}, "dir": "{_DIR_LABELS[event.dir]}"')
    line = f'{{"t": {event.t:.6f}, {fixed[0]}{event.ret}{fixed[1]}'
    if event.data:
        line += f', "data": "{binascii.b2a_base64(event.data, newline=False).decode()}"'
    if event.gated:
        line += ', "gated": true'
    if event.escaped:
        line += ', "escaped": true'
    if not event.last:
        line += ', "last": false'
    return line + "}"


class TracePrinter:
    """Formats events on the tracer thread; the main thread writes them out every
    FLUSH_SECONDS (a write per event cost more than the rest of tracing it). A batch of
    FLUSH_LINES is written at once by the tracer thread, so a slow reader slows the tracer, which
    then drops events rather than slow the server."""

    FLUSH_SECONDS = 0.1
    FLUSH_LINES = 4096

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.format = json_line if as_json else format_line
        self.broken = False
        # appended to by the tracer thread, emptied by whichever thread flushes; a deque's
        # append and popleft need no lock, which cost as much as the rest of taking a line
        self._lines: deque[str] = deque()
        self._flush_lock = threading.Lock()  # batches leave in the order they were taken

    def __call__(self, event: SocketEvent) -> None:
        self._lines.append(self.format(event))
        if len(self._lines) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            pop = self._lines.popleft
            lines = [pop() for _ in range(len(self._lines))]
            if not lines or self.broken:
                return
            try:
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
            except BrokenPipeError:
                self.broken = True


def run_trace(pid: int | None, command: list[str], as_json: bool, snaplen: int) -> int:
    """Trace until Ctrl-C, SIGTERM, a closed output or the process's exit; returns exit status."""
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
    while not signals and not done.wait(printer.FLUSH_SECONDS):
        printer.flush()
        if printer.broken or not tracer.running:
            break
    tracer.detach()
    printer.flush()
    stats = tracer.stats
    print(
        f"detached from {target}: {stats.events} events, {stats.inputs} inputs, "
        f"{stats.bpf_lost} lost (the tracer runs on idle CPU and drops rather than slow the server)",
        file=sys.stderr,
    )
    return 0
