"""Configuration and start-up errors: one line naming file, key and expectation; exit status 2."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from supervise.config import ConfigError, load
from supervise.localcluster import LocalCluster
from tracer import procfs

GOOD = """\
[cluster]
transport = "shm"
durability = "fsync"
secret_file = "cluster.key"

[[node]]
name = "n1"
replication = "127.0.0.1:9101"
server = "127.0.0.1:7001"
status = "127.0.0.1:9201"
data_dir = "n1-data"

[[node]]
name = "n2"
replication = "127.0.0.1:9102"
server = "127.0.0.1:7002"
status = "127.0.0.1:9202"
data_dir = "n2-data"

[[node]]
name = "n3"
replication = "127.0.0.1:9103"
server = "127.0.0.1:7003"
status = "127.0.0.1:9203"
data_dir = "n3-data"
"""

BROKEN = [
    ('transport = "shm"', 'transport = "carrier-pigeon"', "cluster.transport: expected one of"),
    ('durability = "fsync"', 'durability = "sometimes"', "cluster.durability: expected fsync or memory"),
    ('transport = "shm"', 'transport = "tcp"\nheartbeat_ms = "fast"', "cluster.heartbeat_ms: expected int"),
    ('replication = "127.0.0.1:9102"', 'replication = "localhost"', "node 'n2'.replication: expected"),
    ('server = "127.0.0.1:7003"', 'server = "127.0.0.1:99999"', "node 'n3'.server: expected a port"),
    ('status = "127.0.0.1:9202"', 'status = "127.0.0.1:9201"',
     "node 'n2'.status: '127.0.0.1:9201' is also used"),
    ('durability = "fsync"', 'durability = "fsync"\nvip = "10.9.0.1/24"', "cluster.vip_interface: required"),
    ('durability = "fsync"', 'durability = "fsync"\nvip = "not-an-ip"\nvip_interface = "eth0"',
     "cluster.vip: expected"),
    ('durability = "fsync"', 'durability = "fsync"\ncolour = "blue"', "cluster.colour: unknown key"),
    ('durability = "fsync"', 'durability = "fsync"\nspin_us = -5', "cluster.spin_us: expected microseconds"),
    ('durability = "fsync"', 'durability = "fsync"\nidle_poll = "yes"', "cluster.idle_poll: expected bool"),
    ('durability = "fsync"', 'durability = "fsync"\nhold = "both"',
     "cluster.hold: expected inputs or outputs"),
    ('durability = "fsync"', 'durability = "fsync"\nserialize = 1', "cluster.serialize: expected bool"),
    ('durability = "fsync"', 'durability = "fsync"\nhold = "outputs"\nserialize = true',
     'cluster.serialize: expected false with hold = "outputs"'),
    ('[cluster]', '[cluster', "not valid TOML"),
]


def _write(tmp_path, text: str):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path):
    cfg = load(_write(tmp_path, GOOD))
    assert [n.name for n in cfg.nodes] == ["n1", "n2", "n3"]
    assert cfg.node("n2").data_dir == tmp_path / "n2-data"
    assert cfg.heartbeat_ms == 20 and cfg.election_timeout_ms == 300


def test_receive_polling_lasts_200_us_unless_configured(tmp_path):
    assert load(_write(tmp_path, GOOD)).spin_us == 200
    text = GOOD.replace('durability = "fsync"', 'durability = "fsync"\nspin_us = 150', 1)
    assert load(_write(tmp_path, text)).spin_us == 150


def test_idle_cpus_poll_while_inputs_are_held_unless_configured_not_to(tmp_path):
    assert load(_write(tmp_path, GOOD)).idle_poll is True
    text = GOOD.replace('durability = "fsync"', 'durability = "fsync"\nidle_poll = false', 1)
    assert load(_write(tmp_path, text)).idle_poll is False


def test_a_leader_holds_inputs_unless_configured_to_hold_outputs(tmp_path):
    assert load(_write(tmp_path, GOOD)).hold == "inputs"
    text = GOOD.replace('durability = "fsync"', 'durability = "fsync"\nhold = "outputs"', 1)
    assert load(_write(tmp_path, text)).hold == "outputs"


def test_inputs_are_serialized_only_when_configured(tmp_path):
    assert load(_write(tmp_path, GOOD)).serialize is False
    text = GOOD.replace('durability = "fsync"', 'durability = "fsync"\nserialize = true', 1)
    assert load(_write(tmp_path, text)).serialize is True


@pytest.mark.parametrize("old,new,message", BROKEN)
def test_each_config_error_names_the_key_and_the_expectation(tmp_path, old, new, message):
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_config_errors_exit_with_status_2_and_one_line(tmp_path):
    path = _write(tmp_path, GOOD.replace('transport = "shm"', 'transport = "tcp"'))
    (tmp_path / "cluster.key").write_text("secret")
    os.chmod(tmp_path / "cluster.key", 0o644)
    result = subprocess.run([sys.executable, "-m", "supervise", "status", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0  # status does not need the secret
    result = subprocess.run([sys.executable, "-m", "supervise", "--pid", "1", "--config", str(path),
                             "--node", "n9"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"supervise: error: {path}: no [[node]] named 'n9' (the file has n1, n2, n3)")


def test_a_pid_not_listening_on_the_configured_address_is_refused(tmp_path, redis):
    cfg = textwrap.dedent(GOOD)
    path = _write(tmp_path, cfg)
    (tmp_path / "cluster.key").write_text("secret")
    os.chmod(tmp_path / "cluster.key", 0o600)
    result = subprocess.run([sys.executable, "-m", "supervise", "--pid", str(redis.pid),
                             "--config", str(path), "--node", "n1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"pid {redis.pid} does not listen on 127.0.0.1:7001" in line
    assert f"127.0.0.1:{redis.port}" in line


def test_a_node_with_the_wrong_secret_is_refused_and_the_others_carry_on():
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        for node in cluster.nodes:
            cluster.start_server(node)
        for node in cluster.nodes[:2]:
            cluster.start_supervisor(node)
        leader = cluster.wait_leader(timeout=60)
        intruder = cluster.nodes[2]
        bad = cluster.workdir / "bad.toml"
        bad.write_text(cluster.config.read_text().replace('"cluster.key"', '"wrong.key"'))
        (cluster.workdir / "wrong.key").write_text("not the cluster secret")
        os.chmod(cluster.workdir / "wrong.key", 0o600)
        cluster.config, good = bad, cluster.config
        cluster.start_supervisor(intruder)
        cluster.config = good
        import redis as redis_py

        client = redis_py.Redis(port=leader.server_port)
        for i in range(50):
            client.set(f"k{i}", i)
        deadline = time.monotonic() + 20
        refused = ""
        while time.monotonic() < deadline and "bad_secret" not in refused:
            refused = "".join((n.log_path.read_text() if n.log_path else "") for n in cluster.nodes[:2])
            time.sleep(0.2)
        assert "bad_secret" in refused or "authentication" in refused.lower()
        assert redis_py.Redis(port=cluster.nodes[2].server_port).dbsize() == 0
        assert cluster.wait_leader().name == leader.name
        assert client.get("k49") == b"49"


def test_attaching_again_to_a_server_the_node_already_ran_is_refused():
    # a follower's supervisor that stops leaves its server running with the log applied to it;
    # attaching to that process again would apply every entry a second time
    with LocalCluster(n=3, server="redis", transport="shm") as cluster:
        cluster.start(timeout=60)
        leader = cluster.wait_leader(timeout=60)
        follower = next(n for n in cluster.nodes if n is not leader)
        import redis as redis_py

        redis_py.Redis(port=leader.server_port).set("k", "v")
        cluster.wait_applied()
        follower.supervisor.send_signal(signal.SIGTERM)
        assert follower.supervisor.wait(30) == 0
        pid = follower.server.pid
        result = subprocess.run([sys.executable, "-m", "supervise", "--pid", str(pid),
                                 "--config", str(cluster.config), "--node", follower.name],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"supervise: error: pid {pid} has been node {follower.name!r}'s server since")
        assert "start a fresh (empty) server" in line
        assert follower.server.poll() is None
        assert procfs.tracer_pid(pid) == 0
        assert redis_py.Redis(port=follower.server_port).get("k") == b"v"
        cluster.restart(follower)  # a fresh server is taken, and catches up
        assert cluster.wait_leader(timeout=60).name == leader.name
        cluster.wait_applied()
        assert redis_py.Redis(port=follower.server_port).get("k") == b"v"
