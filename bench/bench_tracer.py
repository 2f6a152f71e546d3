"""Cost of watching and gating Redis from outside: redis-benchmark -t set -c 50 against bare
Redis, under `supervise --trace`, under gate mode with an immediate release (as it runs by
default, keeping idle CPUs polling while inputs are held: tracer/idle_poll.py; with that off,
"gate-halting"; and, on a KVM guest whose haltpoll governor does not poll, with that off and the
kernel's default halt-polling window set for that run), under hold-output mode with an immediate
release (tracer/output_hold.py: inputs run on, each output waits for the inputs before it), and
under strace -f. "bare-polling" is bare Redis while idle CPUs poll: how much of gate's gain from
polling is the machine's own.

Usage: .venv/bin/python bench/bench_tracer.py [--requests N] [--rounds N] [--bpf-stats] [--modes M,...]
Prints a table of throughput as ratios to bare: each round runs every mode once, and each ratio
is to the same round's bare run (median and range over the rounds). Also the CPU that Redis and
its watcher (the tracer, or strace) used per request, counted from /proc: steadier than
throughput on a noisy machine. With --bpf-stats, also the time the probes ran in the kernel per
request, as the kernel counts it (kernel.bpf_stats_enabled, on for the run; that counting costs a
little itself): every traced syscall of every process, redis-benchmark's included, since syscall
tracepoints fire system-wide. It does not move with the machine's noise, so it is the figure to
judge a change to tracer/bpf/ by. Writes bench/results/tracer.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RedisServer, print_table, redis_benchmark, round_ratios, write_json  # noqa: E402
from tests.procs import cpu_seconds  # noqa: E402
from tracer.idle_poll import DEVICE, HALT_POLL_DEFAULT_NS, HALT_POLL_NS, IdlePolling, halt_poll_ns  # noqa: E402

GATE_HOLDER = Path(__file__).resolve().parent.parent / "tests" / "gate_holder.py"


def _attach(argv: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream = proc.stderr if ready == "tracing" else proc.stdout
    line = stream.readline()
    if not line.startswith(ready):
        proc.kill()
        raise RuntimeError(f"{argv[:3]} did not attach: {line}")
    if ready == "tracing":
        # --trace prints every event: drain its output so that it never blocks on the pipe
        subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    return proc


def _under(kind: str, server: RedisServer) -> subprocess.Popen | None:
    py = sys.executable
    if kind in ("bare", "bare-polling"):
        return None
    if kind == "trace":
        return _attach([py, "-m", "supervise", "--pid", str(server.pid), "--trace", "--json"],
                       "tracing")
    if kind == "gate":
        return _attach([py, str(GATE_HOLDER), str(server.pid)], "attached")
    if kind == "hold-output":
        return _attach([py, str(GATE_HOLDER), "--hold-output", str(server.pid)], "attached")
    if kind in ("gate-halting", "gate-halt-poll"):
        return _attach([py, str(GATE_HOLDER), "--halting", str(server.pid)], "attached")
    if kind == "strace":
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(server.pid)])
        time.sleep(1.0)
        return proc
    raise ValueError(kind)


# gate-halt-poll runs only where the haltpoll window is 0 (see _halt_polling)
MODES = ("trace", "gate", "hold-output", "gate-halting", "gate-halt-poll", "bare-polling", "strace")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def _machine_setting(kind: str) -> contextlib.AbstractContextManager:
    if kind == "gate-halt-poll":
        return _halt_polling()
    if kind == "bare-polling":
        return _idle_polling()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _idle_polling() -> Iterator[None]:
    """Idle CPUs polling for the block, as gate mode keeps them while inputs are held."""
    request = IdlePolling(linger=float("inf"))
    request.allow()
    request.busy(time.monotonic())
    if not request.held:
        raise RuntimeError(f"bare-polling: cannot open {DEVICE} for writing")
    try:
        yield
    finally:
        request.forbid()


@contextlib.contextmanager
def _halt_polling() -> Iterator[None]:
    """The haltpoll governor's polling window at the kernel's default for the block, then as it
    was (run_rounds uses it where the window is 0)."""
    window = Path(HALT_POLL_NS)
    was = window.read_text()
    window.write_text(str(HALT_POLL_DEFAULT_NS))
    try:
        yield
    finally:
        window.write_text(was)


def _probe_time(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs a process holds open."""
    total = runs = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            fdinfo = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
            info = dict(line.split(":", 1) for line in fdinfo.splitlines())
        except OSError:
            continue
        total += int(info.get("run_time_ns", 0))
        runs += int(info.get("run_cnt", 0))
    return total, runs


def _stop(watcher: subprocess.Popen) -> float:
    """Stop a watcher; returns the CPU seconds it used in all (a --trace still prints what it
    had not read when told to stop): the growth of reaped children's usage around its wait."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    watcher.terminate()
    try:
        watcher.wait(20)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def measure(kind: str, requests: int) -> dict:
    """One redis-benchmark run, with the CPU that Redis and its watcher used per request (µs)."""
    server = RedisServer()
    watcher = _under(kind, server)
    try:
        watcher_before = cpu_seconds(watcher.pid) if watcher is not None else 0.0
        server_before = cpu_seconds(server.pid)
        probes_before = _probe_time(watcher.pid) if watcher is not None else (0, 0)
        result = redis_benchmark(server.port, "set", 50, requests)["SET"]
        result["server_cpu_us"] = (cpu_seconds(server.pid) - server_before) / requests * 1e6
        if watcher is not None and probes_before[1]:
            ns, runs = (a - b for a, b in zip(_probe_time(watcher.pid), probes_before, strict=True))
            result["probe_ns"] = ns / requests
            result["probe_runs"] = runs / requests
        if watcher is not None:
            result["watcher_cpu_us"] = (_stop(watcher) - watcher_before) / requests * 1e6
            watcher = None
        return result
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bpf-stats", action="store_true",
                        help="also report the probes' in-kernel run time per request")
    parser.add_argument("--modes", default="",
                        help="comma-separated modes to run beside bare (default: all of "
                             f"{', '.join(MODES)})")
    args = parser.parse_args()
    args.modes = set(filter(None, args.modes.split(","))) or set(MODES)
    if args.modes - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(args.modes - set(MODES)))} "
                     f"(known: {', '.join(MODES)})")
    if not args.bpf_stats:
        run_rounds(args)
        return
    stats_were = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")
    try:
        run_rounds(args)
    finally:
        BPF_STATS.write_text(stats_were)


def run_rounds(args: argparse.Namespace) -> None:
    if halt_poll_ns() != 0:  # nothing to turn on for that row here
        args.modes.discard("gate-halt-poll")
    kinds = ["bare"] + [m for m in MODES if m in args.modes]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits every kind
        for kind in kinds:
            n = args.requests if kind != "strace" else max(args.requests // 10, 10_000)
            with _machine_setting(kind):
                runs[kind].append(measure(kind, n))
    ratios = {k: round_ratios([r["rps"] for r in runs[k]], [r["rps"] for r in runs["bare"]])
              for k in kinds}
    rows = [[k, f"{statistics.median(r['rps'] for r in runs[k]):.0f}", f"{ratios[k][0]:.2f}x",
             f"{ratios[k][1]:.2f}-{ratios[k][2]:.2f}x",
             f"{statistics.median(r['p50_ms'] for r in runs[k]):.3f}",
             f"{statistics.median(r['p99_ms'] for r in runs[k]):.3f}",
             f"{statistics.median(r['server_cpu_us'] for r in runs[k]):.1f}",
             f"{statistics.median(r.get('watcher_cpu_us', 0.0) for r in runs[k]):.1f}"] for k in kinds]
    header = ["mode", "SET/s (median)", "vs bare (median)", "range", "p50 ms", "p99 ms",
              "Redis CPU us/SET", "watcher CPU us/SET"]
    if args.bpf_stats:
        header += ["probe ns/SET", "probe runs/SET"]
        for k, row in zip(kinds, rows, strict=True):
            probed = [r for r in runs[k] if "probe_ns" in r]
            row += ([f"{statistics.median(r['probe_ns'] for r in probed):.0f}",
                     f"{statistics.median(r['probe_runs'] for r in probed):.1f}"] if probed else ["", ""])
    print(f"redis-benchmark -t set -c 50, {args.rounds} interleaved rounds; ratios to the same "
          "round's bare run")
    print_table(header, rows)
    targets = {"trace": 0.9, "gate": 0.25, "gate-halting": 0.25, "gate-halt-poll": 0.25}
    for kind, target in ((k, t) for k, t in targets.items() if k in ratios):
        ratio = ratios[kind][0]
        print(f"{kind}: {ratio:.2f}x bare (target >= {target}x): {'met' if ratio >= target else 'MISSED'}")
    if "gate" in ratios and "bare-polling" in ratios:
        own = round_ratios([r["rps"] for r in runs["gate"]], [r["rps"] for r in runs["bare-polling"]])
        print(f"gate: {own[0]:.2f}x ({own[1]:.2f}-{own[2]:.2f}x) bare-polling, the same machine "
              "setting")
    path = write_json("tracer", {"requests": args.requests, "runs": runs,
                                 "ratios": {k: dict(zip(("median", "low", "high"), v, strict=True))
                                            for k, v in ratios.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
