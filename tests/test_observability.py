"""Observability: the metrics, the Grafana dashboards and the Prometheus configuration, proven
against a real Prometheus server scraping a real three-node Redis cluster under load.

One cluster, one load and one Prometheus are shared by the module; every process and temporary
directory is removed at the end, also when a test fails.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
import yaml

from supervise.config import load as load_config
from supervise.localcluster import LocalCluster
from supervise.prometheus_cfg import render

from .observability import (
    ALERTS,
    DASHBOARDS,
    PROMTOOL,
    Load,
    Prometheus,
    alert_rules,
    dashboards,
    exported_samples,
    exprs,
    http_get,
    label_values_query,
    metric_names,
    panels,
    refuse_wrong_secret,
    scrape,
    substitute,
    variables,
)
from .workload import redis_snapshot

pytestmark = pytest.mark.timeout(240)

LOAD_CLIENTS = 4
SCRAPES_PER_THREAD = 25  # by each of 8 threads, a fifth of them /status
RATE_WINDOW = "15s"  # what $__rate_interval stands for here (scrapes every second)

@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(n=3, server="redis", transport="shm")
    try:
        c.start(timeout=120)  # bounds for a starved host; a healthy one takes seconds
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.fixture(scope="module")
def load(cluster: LocalCluster) -> Iterator[Load]:
    running = Load(cluster.wait_leader().server_port, LOAD_CLIENTS)
    try:
        running.wait_ops(200)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def prometheus(cluster: LocalCluster, load: Load) -> Iterator[Prometheus]:
    server = Prometheus(render(load_config(cluster.config), interval="1s", rules=str(ALERTS)))
    try:
        yield server
    finally:
        server.stop()


def supervisors(cluster: LocalCluster) -> str:
    return ", ".join(f"{n.name}: " + ("running" if n.supervisor and n.supervisor.poll() is None
                                      else f"exited {n.supervisor.poll() if n.supervisor else None}")
                     for n in cluster.nodes)


# ---- tests ----------------------------------------------------------------------------------

def test_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, call) (rate(supervise_hold_seconds_bucket{node="$node"}'
            '[$__rate_interval]))) - on (replica) group_left max by (node) (x_total and y{a="b{c}"} == 1)')
    assert metric_names(expr) == {"supervise_hold_seconds_bucket", "x_total", "y"}


def test_promtool_accepts_a_live_nodes_metrics(cluster: LocalCluster, load: Load) -> None:
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    for node in (leader, follower):
        text = scrape(node.status_port)
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True,
                             timeout=30)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
            f"{node.name}: {out.stdout.decode()} {out.stderr.decode()}")


def test_metric_values_describe_the_cluster(cluster: LocalCluster, load: Load) -> None:
    leader = cluster.wait_leader()
    load.wait_ops(100)
    for node in cluster.nodes:
        text = scrape(node.status_port)
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line and not line.startswith("#")}
        n = f'node="{node.name}"'
        is_leader = node is leader
        assert values[f"supervise_is_leader{{{n}}}"] == (1 if is_leader else 0)
        assert values[f"supervise_cluster_nodes{{{n}}}"] == 3
        assert values[f"supervise_diverged{{{n}}}"] == 0
        assert values[f"supervise_candidacy_deferred{{{n}}}"] == 0
        assert values[f"supervise_escapes_total{{{n}}}"] == 0
        assert values[f"supervise_tracer_lost_events{{{n}}}"] == 0
        assert values[f"supervise_serial_timeouts{{{n}}}"] == 0
        assert values[f"supervise_input_bytes_total{{{n}}}"] > 0
        assert values[f"supervise_output_bytes_total{{{n}}}"] > 0
        # every load client holds one replicated connection open on every copy
        assert values[f"supervise_open_connections{{{n}}}"] >= LOAD_CLIENTS
        r = f'replica="{node.name}"'
        assert values[f"supervise_consensus_durable_index{{{r}}}"] > 0
        assert values[f"supervise_consensus_log_bytes{{{r}}}"] > 0
        assert values[f"supervise_consensus_log_disk_free_bytes{{{r}}}"] > 0
        for call in ("accept", "accept4", "read", "readv", "recvfrom", "recvmsg"):
            held = values[f'supervise_held_syscalls_total{{call="{call}",{n}}}']
            assert values[f'supervise_hold_seconds_count{{call="{call}",{n}}}'] == held
        if is_leader:
            assert values[f'supervise_held_syscalls_total{{call="read",{n}}}'] > 0
            assert values[f"supervise_consensus_commit_latency_seconds_count{{{r}}}"] > 0
            assert values[f"supervise_consensus_proposals_total{{{r}}}"] > 0
        else:
            assert values[f"supervise_replayed_entries_total{{{n}}}"] > 0
            assert values[f'supervise_held_syscalls_total{{call="read",{n}}}'] == 0
        for peer in cluster.nodes:
            if peer is not node:
                assert values[f'supervise_consensus_peer_reachable{{peer="{peer.name}",{r}}}'] == 1
                assert f'supervise_consensus_replication_lag_entries{{peer="{peer.name}",{r}}}' in values


def test_prometheus_config_is_accepted_by_promtool(cluster: LocalCluster, tmp_path: Path) -> None:
    out = subprocess.run([".venv/bin/supervise", "prometheus-config", "--config", str(cluster.config),
                          "--rules", "dashboards/alerts.yml"],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    path = tmp_path / "prometheus.yml"
    path.write_bytes(out.stdout)
    doc = yaml.safe_load(out.stdout)
    targets = {c["labels"]["node"]: c["targets"] for c in doc["scrape_configs"][0]["static_configs"]}
    assert targets == {n.name: [f"127.0.0.1:{n.status_port}"] for n in cluster.nodes}
    assert doc["rule_files"] == [str(ALERTS)]
    check = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    rules = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in check.stdout.decode()


def test_each_alert_fires_when_its_unit_test_says() -> None:
    """tests/alerts_test.yml: a timeline of faults, and which alerts fire when (promtool's own
    rule evaluator)."""
    out = subprocess.run([PROMTOOL, "test", "rules", str(Path(__file__).parent / "alerts_test.yml")],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_every_metric_an_alert_uses_is_exported(cluster: LocalCluster, load: Load) -> None:
    used = {metric for rule in alert_rules() for metric in metric_names(rule["expr"])} - {"up"}
    assert len(used) >= 7
    for node in cluster.nodes:
        missing = used - exported_samples(scrape(node.status_port))
        assert not missing, f"{node.name} does not export {sorted(missing)}"


def test_a_real_prometheus_evaluates_every_alert_and_none_fires_on_a_healthy_group(
        cluster: LocalCluster, load: Load, prometheus: Prometheus) -> None:
    names = {rule["alert"] for rule in alert_rules()}

    def rules() -> dict[str, dict]:
        groups = prometheus.api("rules", type="alert")["groups"]  # type: ignore[index]
        return {r["name"]: r for g in groups for r in g["rules"]}

    deadline = time.monotonic() + 30
    while any(r["health"] == "unknown" for r in rules().values()) and time.monotonic() < deadline:
        time.sleep(0.5)  # not evaluated yet
    got = rules()
    assert set(got) == names
    assert all(r["health"] == "ok" and not r.get("lastError") for r in got.values()), got
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]  # type: ignore[index]
    assert not firing, f"{firing}; {supervisors(cluster)}"


def test_grafana_provisioning_files_fit_the_dashboards() -> None:
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/supervise.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/supervise.yaml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    uids = set()
    for name, board in dashboards().items():
        uids.add(board["uid"])
        var = variables(board)["datasource"]
        assert var["type"] == "datasource" and var["query"] == "prometheus"
        assert var["current"]["value"] == ds["datasources"][0]["uid"], name
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels(board):
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", f"{name}: {p['title']}"
                assert p["targets"], f"{name}: {p['title']} has no query"
    assert len(uids) == len(dashboards())


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        cluster: LocalCluster, load: Load, prometheus: Prometheus) -> None:
    for node in cluster.nodes:  # so that the refused-handshake panels have something to show
        refuse_wrong_secret(f"127.0.0.1:{node.replication_port}")
    names = sorted(n.name for n in cluster.nodes)
    # Prometheus scrapes every node, labelled by the scrape configuration
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        active = prometheus.api("targets")["activeTargets"]  # type: ignore[index]
        if sorted(t["labels"]["node"] for t in active if t["health"] == "up") == names:
            break
        time.sleep(0.5)
    up = sorted(t["labels"]["node"] for t in active if t["health"] == "up")
    assert up == names, f"{active}; {supervisors(cluster)}\n{cluster.logs()}"

    # every (dashboard, panel, node) query to evaluate, and whether it must have a finite value
    checks: list[tuple[str, str, str, str | None]] = []
    for name, board in dashboards().items():
        vars_ = variables(board)
        node_values: list[str | None] = [None]
        for var in vars_.values():
            if var["type"] == "query":
                metric, label = label_values_query(var)
                got = prometheus.api(f"label/{label}/values", **{"match[]": metric})
                assert sorted(got) == names, f"{name}: variable {var['name']} offers {got}"  # type: ignore[arg-type]
                assert var["name"] == "node", f"{name}: unexpected variable {var['name']}"
                node_values = list(names)
        for title, expr in exprs(board):
            for node in node_values:
                values = {"__rate_interval": RATE_WINDOW, "__interval": "5s"}
                if node is not None:
                    values["node"] = node
                checks.append((name, title, substitute(expr, values), node))
    assert len(checks) > 40

    def failures() -> list[str]:
        bad = []
        finite: dict[tuple[str, str, str], bool] = {}
        for name, title, query, node in checks:
            result = prometheus.query(query)
            if not result:
                bad.append(f"{name} / {title}{f' ({node})' if node else ''}: no data for {query}")
            # per node, a leader-only panel (commit latency) is NaN on followers: one node will do
            key = (name, title, re.sub(r'node="[^"]*"', "", query))
            has_finite = any(math.isfinite(float(r["value"][1])) for r in result)
            finite[key] = finite.get(key, False) or has_finite
        bad += [f"{n} / {t}: no finite value from {q}" for (n, t, q), ok in finite.items() if not ok]
        return bad

    # rates need two scrapes in their window: wait for them without asserting on time
    deadline = time.monotonic() + 45
    bad = failures()
    while bad and time.monotonic() < deadline:
        time.sleep(1)
        bad = failures()
    assert not bad, "\n".join(bad)
    assert not load.errors, repr(load.errors[0])


def test_every_metric_a_dashboard_uses_is_exported(cluster: LocalCluster, load: Load) -> None:
    used: dict[str, set[str]] = {}
    for name, board in dashboards().items():
        for title, expr in exprs(board):
            for metric in metric_names(expr):
                used.setdefault(metric, set()).add(f"{name} / {title}")
        for var in variables(board).values():
            if var["type"] == "query":
                used.setdefault(label_values_query(var)[0], set()).add(f"{name} / variable {var['name']}")
    assert len(used) > 25
    for node in cluster.nodes:
        refuse_wrong_secret(f"127.0.0.1:{node.replication_port}")
        exported = exported_samples(scrape(node.status_port))
        missing = {m: sorted(where) for m, where in used.items() if m not in exported}
        assert not missing, f"{node.name} does not export {missing}"


def test_metrics_endpoint_under_concurrent_scraping_while_loaded(cluster: LocalCluster, load: Load) -> None:
    leader = cluster.wait_leader()
    ops_before = load.ops
    results: list[tuple[int, int] | BaseException] = []
    lock = threading.Lock()

    def scraper(i: int) -> None:
        ports = [n.status_port for n in cluster.nodes]
        for k in range(SCRAPES_PER_THREAD):
            path = "/metrics" if k % 5 else "/status"
            try:
                status, body = http_get(f"http://127.0.0.1:{ports[(i + k) % len(ports)]}{path}", timeout=30)
                ok = status == 200 and (b"supervise_is_leader" in body if path == "/metrics"
                                        else json.loads(body)["node"] in {n.name for n in cluster.nodes})
                outcome: tuple[int, int] | BaseException = (status, int(ok))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                outcome = exc
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=scraper, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8 * SCRAPES_PER_THREAD
    failed = [r for r in results if not (isinstance(r, tuple) and r == (200, 1))]
    assert not failed, (f"{len(failed)} of {len(results)} scrapes failed, e.g. {failed[0]!r}; "
                        f"{supervisors(cluster)}\n{cluster.logs()}")

    # the cluster kept working: writes went on, and still go on, the copies agree
    assert not load.errors, f"{load.errors[0]!r}; {supervisors(cluster)}\n{cluster.logs()}"
    assert load.ops > ops_before
    client = redis_py.Redis(port=leader.server_port, socket_timeout=30)
    try:
        client.set("observability:after-scraping", "ok")
    finally:
        client.close()
    load.stop()
    assert not load.errors, repr(load.errors[0])
    cluster.wait_applied(timeout=60)
    for node in cluster.nodes:
        doc = node.status()
        assert doc is not None and doc["diverged"] is False, doc
        assert doc["escapes"] == 0
        assert re.search(rf'^supervise_divergences_total\{{node="{node.name}"\}} 0\.0$',
                         scrape(node.status_port), re.M)
    reference = redis_snapshot(leader.server_port)
    assert reference[b"observability:after-scraping"] == ("string", b"ok", False)
    for node in cluster.nodes:
        assert redis_snapshot(node.server_port) == reference, f"{node.name} differs from the leader"


def test_prometheus_config_brackets_ipv6_targets(tmp_path: Path) -> None:
    nodes = [("a", "127.0.0.1:9201"), ("b", "[::1]:9202"), ("c", "::1:9203")]
    lines = ['[cluster]', 'transport = "shm"', 'durability = "memory"', ""]
    for i, (name, status) in enumerate(nodes):
        lines += ["[[node]]", f'name = "{name}"', f'replication = "127.0.0.1:{9101 + i}"',
                  f'server = "127.0.0.1:{7001 + i}"', f'status = "{status}"', f'data_dir = "{name}"', ""]
    (tmp_path / "cluster.toml").write_text("\n".join(lines))
    text = render(load_config(tmp_path / "cluster.toml"))
    doc = yaml.safe_load(text)
    got = {c["labels"]["node"]: c["targets"] for c in doc["scrape_configs"][0]["static_configs"]}
    assert got == {"a": ["127.0.0.1:9201"], "b": ["[::1]:9202"], "c": ["[::1]:9203"]}
    (tmp_path / "prometheus.yml").write_text(text)
    check = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
