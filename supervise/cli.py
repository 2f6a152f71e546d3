"""The `supervise` command line."""

from __future__ import annotations

import argparse
import os
import sys

from tracer.probes import MAX_SNAPLEN
from tracer.signalfd import block_sigchld

USAGE = """\
supervise --pid PID --config FILE --node NAME         attach to a running server, join its group
supervise --config FILE --node NAME -- CMD [ARG...]   start the server under supervision, join
supervise status --config FILE [--json]               the group as seen by its nodes
supervise handover --config FILE [--to NODE]          move leadership, stopping nothing
supervise demo                                        the main job on a built-in default
supervise --pid PID --trace [--json] [--snaplen N]    print a process's socket events
supervise --trace [--json] [--snaplen N] -- CMD [ARG...]
supervise prometheus-config --config FILE [--rules F] a Prometheus scrape config for the group
supervise doctor                                      what this machine has and lacks"""


class UsageError(Exception):
    """Bad command line or configuration: one line, exit status 2."""


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supervise", usage=USAGE, add_help=True)
    p.add_argument("--pid", type=int, help="attach to this running process")
    p.add_argument("--config", help="the cluster file (TOML)")
    p.add_argument("--node", help="this node's name in the cluster file")
    p.add_argument("--trace", action="store_true", help="print socket events (nothing is held)")
    p.add_argument("--json", action="store_true", help="with --trace: JSON Lines output")
    p.add_argument("--snaplen", type=int, default=4096, help="with --trace: bytes of payload shown")
    p.add_argument("command", nargs="*", help="command to start under supervision (after --)")
    return p


def _run_main_form(argv: list[str]) -> int:
    parser = _main_parser()
    args = parser.parse_args(argv)
    if args.pid is None and not args.command:
        parser.error("give --pid PID or a command after --")
    if args.pid is not None and args.command:
        parser.error("give either --pid or a command, not both")
    if not args.trace:
        if not args.config or not args.node:
            parser.error("give --config FILE and --node NAME (or --trace)")
        from .config import load
        from .run import run_node

        return run_node(load(args.config), args.node, args.pid, args.command)
    if not 1 <= args.snaplen <= MAX_SNAPLEN:
        parser.error(f"--snaplen must be between 1 and {MAX_SNAPLEN}, not {args.snaplen}")
    from .trace_cmd import run_trace

    return run_trace(args.pid, args.command, args.json, args.snaplen)


def _run_config_command(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"supervise {command}")
    p.add_argument("--config", required=True, help="the cluster file (TOML)")
    if command == "status":
        p.add_argument("--json", action="store_true", help="one JSON object")
    elif command == "handover":
        p.add_argument("--to", help="the node to lead (default: the one best placed to)")
    else:
        p.add_argument("--rules", help="an alerting rule file to load (dashboards/alerts.yml)")
    args = p.parse_args(argv)
    from .config import load

    cluster = load(args.config)
    if command == "status":
        from .status_cmd import run_status

        return run_status(cluster, args.json)
    if command == "handover":
        from .handover import HandoverError, run_handover

        try:
            return run_handover(cluster, args.to)
        except HandoverError as exc:
            print(f"supervise: {exc}", file=sys.stderr)
            return 1
    from .prometheus_cfg import render

    rules = None
    if args.rules:
        rules = os.path.abspath(args.rules)
        if not os.path.isfile(rules):
            raise UsageError(f"--rules {args.rules}: no such file")
    print(render(cluster, rules=rules), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    block_sigchld()
    argv = sys.argv[1:] if argv is None else argv
    from tracer.probes import ProbeError
    from tracer.tracer import AttachError

    from .config import ConfigError
    from .server_record import ServerAlreadyUsed

    try:
        if argv and argv[0] == "doctor":
            from .doctor import run_doctor

            return run_doctor(argv[1:])
        if argv and argv[0] in ("status", "handover", "prometheus-config"):
            return _run_config_command(argv[0], argv[1:])
        if argv and argv[0] == "demo":
            from .demo import run_demo

            return run_demo(argv[1:])
        return _run_main_form(argv)
    except (AttachError, ProbeError, UsageError, ConfigError, ServerAlreadyUsed) as exc:
        print(f"supervise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
