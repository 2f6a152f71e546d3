import pytest

from tracer.signalfd import block_sigchld

from .procs import memcached_server, redis_server
from .tracepoints_held import probe_syscall_tracepoints, tracepoints_held
from .tracing import close_compiled_probes

block_sigchld()


@pytest.fixture(scope="session", autouse=True)
def _probe_tracepoints_kept_in_use():
    """A killed supervisor is reaped without waiting on the kernel for each tracepoint
    (tests/tracepoints_held.py)."""
    with tracepoints_held(probe_syscall_tracepoints()):
        yield


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
