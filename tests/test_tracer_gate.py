"""Gate mode holds inputs; attaching, detaching and dying never harm the server."""

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import redis as redis_py

from tracer.events import ACCEPTS, Direction
from tracer.idle_poll import current_limit_us
from tracer.procfs import pending_signals, socket_fds, status_field
from tracer.tracer import Mode, Tracer

from .procs import alive, python_server, wait_until
from .tracing import start_trace_cli, traced

PING = b"*1\r\n$4\r\nPING\r\n"
SYS_RECVFROM, SYS_ACCEPT4 = 45, 288  # x86_64


def _ping(port: int) -> bool:
    return redis_py.Redis(port=port, socket_timeout=5).ping()


def _served(tracer, rec, port: int, request_: bytes) -> bytes:
    """A new client's accept and request let through; the server's reply."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        tracer.release(rec.next_input())
        client.sendall(request_)
        tracer.release(rec.next_input())
        client.settimeout(5)
        return client.recv(100)


def test_held_input_gets_no_reply_until_released(redis):
    with traced(redis.pid, Mode.GATE, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())  # the accept
        client.sendall(PING)
        held = rec.next_input()
        assert held.data == PING and held.gated
        client.settimeout(0.5)
        try:
            reply = client.recv(100)
        except TimeoutError:
            reply = None
        assert reply is None, "the server answered an input that was still held"
        assert tracer.stats.held == 1
        tracer.release(held)
        client.settimeout(5)
        assert client.recv(100) == b"+PONG\r\n"
        client.close()


def test_a_thread_already_blocked_in_recv_at_attach_has_its_input_held():
    server = python_server("threaded_echo.py")
    try:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"warm")
        assert client.recv(100) == b"WARM"  # its server thread is now blocked in recv
        with traced(server.pid, Mode.GATE, auto_release=False) as (tracer, rec):
            client.sendall(b"hello")
            held = rec.next_input()
            assert (held.data, held.gated) == (b"hello", True)
            client.settimeout(0.5)
            with pytest.raises(TimeoutError):
                client.recv(100)
            tracer.release(held)
            client.settimeout(5)
            assert client.recv(100) == b"HELLO"
        client.close()
    finally:
        server.stop()


def test_a_refused_input_never_reaches_the_server_and_its_client_is_dropped(redis):
    with traced(redis.pid, Mode.GATE, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        client.sendall(b"*3\r\n$3\r\nSET\r\n$7\r\nrefused\r\n$1\r\n1\r\n")
        tracer.refuse(rec.next_input())
        client.settimeout(5)
        assert client.recv(100) == b"", "the server should drop the connection"
        assert _served(tracer, rec, redis.port, b"*2\r\n$6\r\nEXISTS\r\n$7\r\nrefused\r\n") == b":0\r\n"


def test_an_accept_refused_with_eagain_leaves_the_server_unaware_of_the_connection(redis):
    client_id = b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n"
    with traced(redis.pid, Mode.GATE, auto_release=False) as (tracer, rec):
        first = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        first.sendall(client_id)
        tracer.release(rec.next_input())
        first.settimeout(5)
        first_id = int(first.recv(100)[1:])
        refused = socket.create_connection(("127.0.0.1", redis.port))
        tracer.refuse(rec.next_input(), errno.EAGAIN)
        later = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        later.sendall(client_id)
        tracer.release(rec.next_input())
        later.settimeout(5)
        assert int(later.recv(100)[1:]) == first_id + 1, "the server created a client for it"
        for sock in (first, refused, later):
            sock.close()


@pytest.mark.parametrize("kind, request_, reply", [
    ("redis", PING, b"+PONG\r\n"),
    ("memcached", b"set k 0 0 1\r\nx\r\n", b"STORED\r\n"),  # its accepts are in another thread
])
def test_a_refused_accept_leaves_no_descriptor_open_in_the_server(kind, request_, reply, request):
    server = request.getfixturevalue(kind)
    with traced(server.pid, Mode.GATE, auto_release=False) as (tracer, rec):
        first = socket.create_connection(("127.0.0.1", server.port))
        tracer.release(rec.next_input())
        before = set(socket_fds(server.pid))
        refused = socket.create_connection(("127.0.0.1", server.port))
        accept = rec.next_input()
        assert accept.ret not in before
        tracer.refuse(accept, errno.EAGAIN)
        refused.settimeout(5)
        assert refused.recv(100) == b"", "the connection should end with its only descriptor"
        assert set(socket_fds(server.pid)) == before
        first.sendall(request_)
        tracer.release(rec.next_input())
        first.settimeout(5)
        assert first.recv(100) == reply
        later = socket.create_connection(("127.0.0.1", server.port))
        reused = rec.next_input()
        assert reused.ret == accept.ret, "the descriptor number is free again"
        tracer.release(reused)
        later.sendall(request_)
        tracer.release(rec.next_input())
        later.settimeout(5)
        assert later.recv(100) == reply
        assert not [ev for ev in rec.seen if ev.conn == accept.conn and ev is not accept], \
            "an event was reported for the refused connection"
        for sock in (first, refused, later):
            sock.close()


_syscall = ctypes.CDLL(None, use_errno=True).syscall


def _tgkill(pid: int, tid: int, sig: int) -> None:
    if _syscall(234, pid, tid, sig) != 0:  # SYS_tgkill
        raise OSError(ctypes.get_errno(), "tgkill")


def _wake_with_signals_queued(pid: int, tid: int, blocked_in: int, wake: Callable[[], object],
                              signals: Iterable[int]) -> None:
    """Once thread ``tid`` of ``pid`` sleeps in syscall number ``blocked_in``, ``wake`` wakes it
    and ``signals`` are queued for it before it can run: a forked child does both on the thread's
    only CPU at real-time priority. A child, because this process has other threads: waiting for
    Python's lock after ``wake`` would let the woken thread run first. (A thread that is still on
    its way to that syscall would take the signals before it gets there.)"""
    wait_until(lambda: Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
               == str(blocked_in), 5, f"thread {tid} to block in syscall {blocked_in}")
    cpu = min(os.sched_getaffinity(0))
    theirs = os.sched_getaffinity(tid)
    os.sched_setaffinity(tid, {cpu})
    try:
        done_r, done_w = os.pipe()
        with open(done_r, "rb", buffering=0) as done:
            try:
                if os.fork() == 0:  # the tracer's wait for any child reaps it: it reports here
                    try:
                        os.sched_setaffinity(0, {cpu})
                        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                        wake()
                        for sig in signals:
                            _tgkill(pid, tid, sig)
                        os.write(done_w, b"k")
                    finally:
                        os._exit(0)
            finally:
                os.close(done_w)
            assert done.read(1) == b"k", "the child that wakes the thread failed"
    finally:
        os.sched_setaffinity(tid, theirs)


@pytest.mark.parametrize("signals", [(signal.SIGUSR1,), (signal.SIGUSR1, signal.SIGUSR2)],
                         ids=["one handler", "two handlers, one entered on top of the other"])
def test_an_input_refused_after_a_signal_handler_was_entered_still_fails_in_the_server(
        signals, caplog):
    """A signal queued in the instant between a held read's return and its stop is delivered
    first (SIGUSR1 before the gate's SIGSTOP): the thread stops at the handler's entry, and the
    read's result waits in the handler's frame. Refusing must rewrite it there."""
    server = python_server("threaded_echo.py")
    caplog.set_level(logging.INFO, logger="tracer")
    try:
        with traced(server.pid, Mode.GATE, auto_release=False) as (tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            tracer.release(rec.next_input())
            client.sendall(b"warm")
            warm = rec.next_input()
            tracer.release(warm)
            client.settimeout(5)
            assert client.recv(100) == b"WARM"  # its thread is blocked in recv again
            _wake_with_signals_queued(server.pid, warm.tid, SYS_RECVFROM,
                                      lambda: client.sendall(b"hello"), signals)
            held = rec.next_input()
            assert (held.data, held.tid) == (b"hello", warm.tid)
            tracer.refuse(held)
            try:
                reply = client.recv(100)
            except ConnectionResetError:
                reply = b""
            assert reply == b"", "the server read the refused input"
        assert "recvfrom on connection" in caplog.text and "from a signal handler's frame" in caplog.text
    finally:
        server.stop()


def test_an_accept_refused_after_a_signal_handler_was_entered_is_closed_in_the_server(caplog):
    server = python_server("threaded_echo.py")  # it accepts in its main thread
    caplog.set_level(logging.INFO, logger="tracer")
    try:
        with traced(server.pid, Mode.GATE, auto_release=False) as (tracer, rec):
            before = set(socket_fds(server.pid))
            refused = socket.socket()
            _wake_with_signals_queued(server.pid, server.pid, SYS_ACCEPT4,
                                      lambda: refused.connect(("127.0.0.1", server.port)),
                                      [signal.SIGUSR1])
            accept = rec.next_input()
            tracer.refuse(accept, errno.EAGAIN)
            refused.settimeout(5)
            assert refused.recv(100) == b"", "the connection should end with its only descriptor"
            assert set(socket_fds(server.pid)) == before
            assert _served(tracer, rec, server.port, b"after") == b"AFTER", "the next client"
        assert "accept4 on connection" in caplog.text and "from a signal handler's frame" in caplog.text
    finally:
        server.stop()


def test_an_accept_refused_while_a_signal_waits_for_its_held_thread_is_closed_in_the_server(
        caplog):
    """The signal stays queued while the thread closes the refused descriptor (it would
    otherwise be taken first and the descriptor left open), then reaches the thread, whose
    signal mask is as it was."""
    server = python_server("threaded_echo.py")
    caplog.set_level(logging.INFO, logger="tracer")
    usr1 = 1 << (signal.SIGUSR1 - 1)
    try:
        with traced(server.pid, Mode.GATE, auto_release=False) as (tracer, rec):
            before = set(socket_fds(server.pid))
            blocked = status_field(server.pid, "SigBlk")
            refused = socket.create_connection(("127.0.0.1", server.port))
            accept = rec.next_input()
            _tgkill(server.pid, accept.tid, signal.SIGUSR1)
            assert pending_signals(accept.tid) & usr1, "queued while the thread is held"
            tracer.refuse(accept, errno.EAGAIN)
            refused.settimeout(5)
            assert refused.recv(100) == b"", "the connection should end with its only descriptor"
            assert set(socket_fds(server.pid)) == before
            assert _served(tracer, rec, server.port, b"after") == b"AFTER", "the next client"
            assert not pending_signals(accept.tid) & usr1, "the signal reached the thread"
            assert status_field(server.pid, "SigBlk") == blocked
        assert "stays open" not in caplog.text
    finally:
        server.stop()


def test_server_keeps_serving_after_trace_exits(redis):
    proc = start_trace_cli("--pid", str(redis.pid))
    assert _ping(redis.port)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert _ping(redis.port)
    assert _tracer_of(redis.pid) == 0


def test_server_keeps_serving_after_trace_is_killed(redis):
    proc = start_trace_cli("--pid", str(redis.pid))
    client = redis_py.Redis(port=redis.port, socket_timeout=5)
    for i in range(200):
        client.set(f"k{i}", i)
    proc.kill()
    proc.communicate(timeout=20)
    assert client.get("k199") == b"199"
    assert _ping(redis.port)


def test_detach_from_gate_mode_releases_held_threads_and_server_runs_on(redis):
    with traced(redis.pid, Mode.GATE, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        client.sendall(PING)
        rec.next_input()
        assert tracer.stats.held == 1
    client.settimeout(5)
    assert client.recv(100) == b"+PONG\r\n"
    assert _ping(redis.port)
    assert _stopped_state(redis.pid) is False
    assert _tracer_of(redis.pid) == 0


def test_killing_a_gating_supervisor_kills_its_server(redis):
    holder = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "gate_holder.py"), str(redis.pid)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "attached"
        assert _ping(redis.port)
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 10
        while alive(redis.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(redis.pid), "EXITKILL should take the server down with its supervisor"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("mode", [Mode.GATE, Mode.HOLD_OUTPUT])
def test_a_tracer_that_fails_while_holding_kills_the_server_instead_of_letting_it_run_unheld(
        redis, mode, caplog):
    def on_event(event):
        if event.call in ACCEPTS:
            tracer.release(event)
        elif event.input:
            raise RuntimeError("a bug in the caller's handler")

    tracer = Tracer(Mode.GATE, on_event)
    tracer.attach(redis.pid)
    try:
        tracer.set_mode(mode)
        client = socket.create_connection(("127.0.0.1", redis.port))
        client.sendall(PING)
        assert tracer.wait(10), "the tracer thread should end with its failure"
        wait_until(lambda: not alive(redis.pid), 10, "the server to be killed")
        client.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(100) == b"", "the server answered an input nobody held"
        client.close()
        assert "killing them, since they must not run unheld" in caplog.text
    finally:
        tracer.detach()


def test_a_mode_change_racing_the_servers_exit_finishes_before_the_probes_close(redis):
    tracer = Tracer(Mode.GATE, lambda event: tracer.release(event) if event.gated else None)
    tracer.attach(redis.pid)
    check = tracer._can_hold_outputs

    def server_dies_meanwhile() -> str | None:
        why = check()
        os.kill(redis.pid, signal.SIGKILL)
        tracer.wait(2)  # long enough for the tracer thread to close its probes, unless held off
        return why

    tracer._can_hold_outputs = server_dies_meanwhile
    try:
        tracer.set_mode(Mode.HOLD_OUTPUT)
        assert tracer.wait(10), "the tracer thread should end with its server"
        assert tracer.probes is None
    finally:
        tracer.detach()


def test_observe_mode_never_kills_the_server_with_its_tracer(redis):
    proc = start_trace_cli("--pid", str(redis.pid))
    proc.kill()
    proc.wait(10)
    assert alive(redis.pid)
    assert _ping(redis.port)


def test_sigcont_sent_to_a_gated_server_is_detected_as_an_escape(redis):
    """SIGCONTs in bursts, with pauses: each one traps every thread of a seized process once
    (PTRACE_EVENT_STOP) until its tracer lets it go on, so a SIGCONT sent without pause could
    keep the server from getting anywhere for seconds."""
    escapes = []
    with traced(redis.pid, Mode.GATE) as (tracer, _rec):
        tracer.on_escape = escapes.append
        spammer = subprocess.Popen([
            sys.executable, "-c",
            "import os, signal, time\nwhile True:\n"
            f"    for _ in range(200): os.kill({redis.pid}, signal.SIGCONT)\n"
            "    time.sleep(0.001)",
        ])
        try:
            client = socket.create_connection(("127.0.0.1", redis.port))
            client.settimeout(20)
            deadline = time.monotonic() + 60
            while tracer.stats.escapes == 0 and time.monotonic() < deadline:
                client.sendall(PING)
                assert client.recv(100) == b"+PONG\r\n"
        finally:
            spammer.kill()
            spammer.wait()
        assert tracer.stats.escapes >= 1
        assert escapes and all(e.escaped and e.dir is Direction.IN for e in escapes)
    assert _ping(redis.port)


def _tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError("no TracerPid line")


def _stopped_state(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().split(") ")[1][0]
        if state in "Tt":
            return True
    return False


def _cpus_halt_as_usual() -> int:
    limit = current_limit_us()
    assert limit > 0, "another process keeps idle CPUs polling; this test needs them free"
    return limit


@pytest.mark.serial  # the machine's idle-CPU latency, which any gating tracer changes
def test_idle_cpus_poll_while_held_inputs_flow_and_halt_again_once_they_stop(redis):
    unheld = _cpus_halt_as_usual()
    with traced(redis.pid, Mode.GATE) as (tracer, _rec):
        assert current_limit_us() == unheld, "nothing was held yet"
        assert _ping(redis.port)
        assert current_limit_us() == 0
        wait_until(lambda: current_limit_us() == unheld, 5, "idle CPUs to halt again")
        assert _ping(redis.port)
        assert current_limit_us() == 0
        tracer.set_mode(Mode.OBSERVE)
        assert current_limit_us() == unheld
        assert _ping(redis.port)
        assert current_limit_us() == unheld
        tracer.set_mode(Mode.GATE)
        assert _ping(redis.port)
        assert current_limit_us() == 0
    assert current_limit_us() == unheld


@pytest.mark.serial  # the machine's idle-CPU latency, which any gating tracer changes
def test_idle_cpus_keep_halting_under_a_gate_told_not_to_poll(redis):
    unheld = _cpus_halt_as_usual()
    with traced(redis.pid, Mode.GATE, idle_poll=False):
        for _ in range(3):
            assert _ping(redis.port)
            assert current_limit_us() == unheld


def test_a_thread_that_takes_sigchld_is_named_when_a_tracer_starts(redis, caplog):
    started, done = threading.Event(), threading.Event()

    def careless() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        started.set()
        done.wait(30)

    thread = threading.Thread(target=careless, name="careless")
    thread.start()
    started.wait(5)
    try:
        with caplog.at_level(logging.WARNING, logger="tracer"), traced(redis.pid, Mode.OBSERVE):
            pass
    finally:
        done.set()
        thread.join()
    assert f"({thread.native_id})" in caplog.text
    assert "block_sigchld" in caplog.text
