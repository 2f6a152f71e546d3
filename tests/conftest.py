import pytest

from tracer.signalfd import block_sigchld

from .procs import memcached_server, redis_server

block_sigchld()


@pytest.fixture
def redis():
    server = redis_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def memcached():
    server = memcached_server(threads=4)
    try:
        yield server
    finally:
        server.stop()
