"""The probes' maps, shared by the tracer and the programs in the kernel."""

import subprocess
import sys
import time

from tracer import probes

from .tracepoints_held import probe_syscall_tracepoints
from .tracing import compiled_probes

CLOSER = """
import socket
s = socket.socket(); print(s.fileno(), flush=True); s.close()
while True:
    socket.socket().close()
"""


def test_a_socket_the_close_probe_takes_out_meanwhile_is_dropped_without_error():
    """The tracer and the close probe both take a closed socket out of the map; whichever comes
    second must find it gone, not fail."""
    closer = subprocess.Popen([sys.executable, "-c", CLOSER], stdout=subprocess.PIPE)
    tracked = None
    try:
        fd = int(closer.stdout.readline())
        tracked = probes.Probes()
        tracked.supervise_tgid(closer.pid, probes.MODE_OBSERVE)
        taken_out_by_the_probe = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            tracked.add_socket(closer.pid, fd, probes.SOCK_CONN)
            time.sleep(0)
            taken_out_by_the_probe += tracked.sockets_of(closer.pid) == {}
            tracked.drop_socket(closer.pid, fd)
        assert taken_out_by_the_probe > 0  # the probe did race the tracer
    finally:
        closer.kill()
        closer.wait()
        if tracked is not None:
            tracked.close()


def test_the_tracepoints_a_test_run_keeps_in_use_are_the_syscall_tracepoints_the_probes_attach_to():
    attached = {tp.decode() for tp in compiled_probes().bpf.tracepoint_fds}
    assert set(probe_syscall_tracepoints()) == {tp for tp in attached if tp.startswith("syscalls:")}
