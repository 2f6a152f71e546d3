"""Helpers for the observability tests: PromQL and dashboard parsing, a Redis load, a real
Prometheus server, and a peer that fails the transport handshake."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
import yaml

from rdma import ConnectError, connect, open_context
from supervise.localcluster import free_ports, wait_port

from .workload import redis_op

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

# ---- PromQL helpers -------------------------------------------------------------------------

_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "group", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels dropped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group().lower() in _NOT_METRICS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def alert_rules() -> list[dict]:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert rules, f"no alerting rules in {ALERTS}"
    return rules


def dashboards() -> dict[str, dict]:
    found = {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
    assert len(found) >= 2, f"no dashboards in {DASHBOARDS}"
    return found


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def exprs(board: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every query target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def variables(board: dict) -> dict[str, dict]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"template variable {name!r} in {expr!r} has no value"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)


def label_values_query(var: dict) -> tuple[str, str]:
    q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", q)
    assert m, f"variable {var['name']}: only label_values(metric, label) queries are used: {q!r}"
    return m.group(1), m.group(2)


def exported_samples(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


# ---- live processes -------------------------------------------------------------------------

def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def scrape(port: int) -> str:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


class Load:
    """Redis clients writing to the leader until stopped; every failure is kept."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.ops = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        client = redis_py.Redis(port=self.port, socket_timeout=30)
        try:
            while not self._stop.is_set():
                redis_op(client, rng)
                with self._lock:
                    self.ops += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the tests
            self.errors.append(exc)
        finally:
            client.close()

    def wait_ops(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        start = self.ops
        while self.ops - start < n and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.errors, f"writes failed: {self.errors[0]!r}"
        assert self.ops - start >= n, f"only {self.ops - start} writes in {timeout:.0f}s"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=40)


class Prometheus:
    """Debian's Prometheus server on a free loopback port, its data in a temporary directory."""

    def __init__(self, config: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="supervise-prometheus-"))
        self.proc: subprocess.Popen | None = None
        try:
            (self.dir / "prometheus.yml").write_text(config)
            self.port = free_ports(1)[0]
            self.log = open(self.dir / "prometheus.log", "wb")
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=self.log, stderr=subprocess.STDOUT)
            wait_port(self.port, timeout=30)
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Prometheus answers 503 until its storage is open (slow on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=5)[0] == 200:
                    return
            except OSError:  # urllib's HTTPError (503) is an OSError too
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus not ready in {timeout:.0f}s "
                                   f"(see {self.dir / 'prometheus.log'})")
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> object:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def refuse_wrong_secret(endpoint: str) -> None:
    """A peer with the wrong cluster secret tries the node's transport handshake and is refused."""
    ctx = open_context("shm")
    try:
        pd = ctx.alloc_pd()
        cq = ctx.create_cq(16)
        with pytest.raises(ConnectError):
            connect(ctx, pd, endpoint, b"not the cluster secret", cq, cq, b"")
    finally:
        ctx.close()


