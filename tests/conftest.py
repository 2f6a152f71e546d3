import pytest

from tracer.signalfd import block_sigchld

from .procs import memcached_server, redis_server
from .tracing import close_compiled_probes

block_sigchld()


@pytest.fixture(scope="module", autouse=True)
def _compiled_probes_closed_after_each_module():
    """Probes the module's tracers shared stop running on the machine's syscalls with it."""
    yield
    close_compiled_probes()


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
