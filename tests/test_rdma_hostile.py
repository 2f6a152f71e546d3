"""Hostile input on the listener and in the handshake: refused or dropped, listener alive,
nothing written to any region. The listener runs in a real peer process."""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdma import cm

from .rdma_support import ALL, SECRET, Local, Peer, wait_until

pytestmark = pytest.mark.timeout(180)

REGIONS = {"log": (65536, ALL), "ctl": (4096, ALL)}


@pytest.fixture(scope="module", params=["tcp", "shm"])
def target(request):
    peer = Peer(request.param, REGIONS, handshake_timeout=0.5)
    try:
        yield peer
    finally:
        peer.close()


def _exchange(endpoint: str, chunks: list[bytes], hello: str | None = None) -> bytes:
    """Send ``chunks`` (optionally after a valid hello), half-close, read until the peer drops us."""
    host, port = cm.parse_endpoint(endpoint)
    got = b""
    with socket.create_connection((host, port), timeout=5) as s:
        if hello is not None:  # a valid hello for provider ``hello`` first
            nonce = os.urandom(32).hex()
            s.sendall(
                _frame({"t": "hello", "magic": cm.MAGIC, "v": cm.VERSION, "provider": hello, "nonce": nonce})
            )
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                continue
            if not data:
                break
            got += data
        else:
            raise AssertionError("listener kept a hostile connection open")
    return got


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _assert_untouched_and_alive(peer: Peer) -> None:
    for name, (size, _) in REGIONS.items():
        assert peer.read(name, 0, size) == bytes(size), f"region {name} was written"
    loc = Local(peer.provider)
    try:
        qp, remote = loc.connect(peer)
        assert peer.call("accept", 5) is not None
        addr, _, rkey = remote["ctl"]
        loc.mr.buf[:2] = b"ok"
        qp.post_write(loc.mr, 0, 2, addr, rkey, wr_id=1)
        assert loc.wait(1)[0].status == 0
        assert peer.read("ctl", 0, 2) == b"ok"
        peer.call("fill", "ctl", 0, "0000")
    finally:
        loc.close()


hostile = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@hostile
@given(data=st.binary(max_size=2048))
def test_random_bytes_refused(target, data):
    _exchange(target.endpoint, [data])


@hostile
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(_frame, st.dictionaries(st.sampled_from(["t", "proof", "nonce", "params"]), st.text())),
            st.just(_frame({"t": "auth", "proof": "00" * 32})),
            st.just(_frame({"t": "params", "params": {"pid": 1}, "private": "", "mac": "x"})),
            st.just(struct.pack(">I", 0xFFFFFFFF)),
        ),
        max_size=4,
    ),
    cut=st.integers(min_value=0, max_value=200),
)
def test_garbage_mid_handshake_refused(target, frames, cut):
    blob = b"".join(frames)
    _exchange(target.endpoint, [blob[: len(blob) - cut] if cut < len(blob) else blob], hello=target.provider)


def test_hostile_leaves_regions_untouched_and_listener_serving(target):
    _exchange(target.endpoint, [os.urandom(100)])
    _exchange(target.endpoint, [struct.pack(">I", 10**9)])
    _exchange(target.endpoint, [_frame({"t": "auth", "proof": "ab" * 32})], hello=target.provider)
    _assert_untouched_and_alive(target)
    refused = target.call("refused")
    assert refused.get("garbage", 0) + refused.get("truncated", 0) >= 1
    assert refused.get("oversize", 0) >= 1


def test_stallers_are_timed_out_while_others_are_served(target):
    host, port = cm.parse_endpoint(target.endpoint)
    before = target.call("refused").get("timeout", 0)
    stallers = [socket.create_connection((host, port)) for _ in range(10)]
    try:
        for s in stallers:
            s.sendall(b"\x00\x00")  # two bytes of a length, then silence
        _assert_untouched_and_alive(target)  # served while the stallers hang
        assert wait_until(lambda: target.call("refused").get("timeout", 0) >= before + 10, timeout=10)
        for s in stallers:
            s.settimeout(5)
            assert s.recv(10) == b""  # dropped
    finally:
        for s in stallers:
            s.close()


def test_wrong_secret_cannot_write(target):
    loc = Local(target.provider)
    try:
        with pytest.raises(cm.ConnectError):
            loc.connect(target, secret=SECRET + b"x")
    finally:
        loc.close()
    _assert_untouched_and_alive(target)
