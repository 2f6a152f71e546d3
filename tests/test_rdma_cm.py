"""Connection management: secret files, provider selection, metrics."""

from __future__ import annotations

import os
import re

import pytest
from prometheus_client import generate_latest

from rdma import Listener, SecretFileError, VerbsError, open_context, rdma_devices, read_secret
from rdma.cm import is_local_host, parse_endpoint

from .rdma_support import ALL, SECRET, Local, Peer, PeerError, wait_until

pytestmark = pytest.mark.timeout(60)


def test_secret_file_mode_is_checked(tmp_path):
    path = tmp_path / "cluster.secret"
    path.write_bytes(b"s3cret\n")
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match=str(path)) as e:
        read_secret(str(path))
    assert "0644" in str(e.value) and "0600" in str(e.value)
    os.chmod(path, 0o600)
    assert read_secret(str(path)) == b"s3cret"
    os.chmod(path, 0o400)
    assert read_secret(str(path)) == b"s3cret"
    empty = tmp_path / "empty.secret"
    empty.write_bytes(b"\n")
    os.chmod(empty, 0o600)
    with pytest.raises(SecretFileError, match="empty"):
        read_secret(str(empty))
    with pytest.raises(SecretFileError, match="missing.secret"):
        read_secret(str(tmp_path / "missing.secret"))


def test_auto_provider_selection():
    ctx = open_context("auto", ["127.0.0.1", "localhost:7000"])
    try:
        assert ctx.provider == "shm"  # no RDMA device here, every peer local
    finally:
        ctx.close()
    ctx = open_context("auto", ["127.0.0.1", "10.77.250.250"])
    try:
        assert ctx.provider == "tcp"
    finally:
        ctx.close()
    assert is_local_host("127.0.0.1") and not is_local_host("10.77.250.251")
    with pytest.raises(ValueError):
        open_context("nonsense")
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_endpoint("no-port")


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_metrics_are_exported(provider):
    local = Local(provider)
    peer = Peer(provider, {"log": (4096, ALL)})
    intruder = Peer(provider, {"x": (4096, ALL)}, secret=b"wrong secret")
    lst = Listener(local.ctx, local.pd, "127.0.0.1:0", SECRET, local.cq, local.cq, b"")
    try:
        qp, remote = local.connect(peer)
        addr, _, rkey = remote["log"]
        qp.post_write(local.mr, 0, 100, addr, rkey, wr_id=1)
        assert local.wait(1)[0].status == 0
        qp.post_write(local.mr, 0, 100, addr + 4096, rkey, wr_id=2)
        assert local.wait(1)[0].status != 0
        with pytest.raises(PeerError, match="ConnectError"):
            intruder.call("connect", lst.endpoint)
        assert wait_until(lambda: lst.refusals().get("bad_secret", 0) == 1)
    finally:
        lst.close()
        intruder.close()
        peer.close()
        local.close()
    text = generate_latest().decode()
    assert f'supervise_transport_writes_total{{provider="{provider}"}}' in text
    assert f'supervise_transport_write_bytes_total{{provider="{provider}"}}' in text
    assert f'supervise_transport_errors_total{{provider="{provider}"}}' in text
    refused = re.search(r'supervise_transport_auth_failures_total\{reason="bad_secret"\} (\S+)', text)
    assert refused and float(refused.group(1)) >= 1


def test_verbs_without_a_device_fails_clearly():
    if rdma_devices():  # a device exists: the conformance suite runs the verbs provider instead
        ctx = open_context("verbs")
        ctx.close()
        return
    with pytest.raises(VerbsError, match="no RDMA device"):
        open_context("verbs")
