"""Shared pieces of the benchmarks: real servers on free ports, result tables and JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervise.localcluster import free_ports, wait_port

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    return free_ports(1)[0]


class RedisServer:
    def __init__(self, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *(extra or [])],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_benchmark(port: int, tests: str, clients: int, requests: int) -> dict[str, dict]:
    """Run redis-benchmark; returns per test: rps, p50_ms, p99_ms."""
    run = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", tests, "-c", str(clients), "-n", str(requests),
         "-r", "1000", "--csv"],
        capture_output=True, text=True, timeout=600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {(run.stderr or run.stdout).strip()[-300:]}")
    out = run.stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    return {
        row["test"]: {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
                      "p99_ms": float(row["p99_latency_ms"])}
        for row in rows
    }


def write_json(name: str, doc: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    doc = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": sys.version.split()[0]}, "time": time.time(), **doc}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def round_ratios(values: list[float], baselines: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of each round's figure over the same round's baseline: these
    machines move by half from one minute to the next, so a ratio is only taken within a round."""
    ratios = sorted(v / b for v, b in zip(values, baselines, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs))
        if n == 0:
            print("  ".join("-" * w for w in widths))
