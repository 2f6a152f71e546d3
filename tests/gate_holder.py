"""Runs the tracer in gate mode against a pid, releasing every input at once (for tests that
need a gating supervisor in its own process, e.g. to kill it, and for the tracer benchmark).

Usage: gate_holder.py [--halting] [--hold-output] PID
(--halting: idle CPUs halt even while inputs are held; --hold-output: hold outputs instead)
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
    pid = int([a for a in args if not a.startswith("--")][0])
    tracer = Tracer(Mode.GATE, on_event, idle_poll=not halting)
    tracer.attach(pid)
    if "--hold-output" in args:
        tracer.set_mode(Mode.HOLD_OUTPUT)
    print("attached", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
