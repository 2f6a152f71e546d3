"""Runs the tracer in gate mode against a pid, releasing every input at once (for tests that
need a gating supervisor in its own process, e.g. to kill it, and for the tracer benchmark).

Usage: gate_holder.py [--halting] PID   (--halting: idle CPUs halt even while inputs are held)
"""

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

    args = sys.argv[1:]
    halting = "--halting" in args
    pid = int([a for a in args if a != "--halting"][0])
    tracer = Tracer(Mode.GATE, on_event, idle_poll=not halting)
    tracer.attach(pid)
    print("attached", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
