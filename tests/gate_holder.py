"""Runs the tracer in gate mode against a pid, releasing every input at once (for tests that
need a gating supervisor in its own process, e.g. to kill it)."""

import sys
import threading

from tracer.signalfd import block_sigchld
from tracer.tracer import Mode, Tracer


def main() -> None:
    block_sigchld()
    tracer: Tracer

    def on_event(event):
        if event.gated:
            tracer.release(event)

    tracer = Tracer(Mode.GATE, on_event)
    tracer.attach(int(sys.argv[1]))
    print("attached", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
