"""The future a proposal returns: waiters, callbacks and failures behave as a
concurrent.futures.Future's do for the parts a proposer uses."""

from __future__ import annotations

import threading

import pytest

from consensus import CommitFuture, NotLeader


def test_every_waiting_thread_wakes_with_the_result() -> None:
    fut = CommitFuture()
    got: list[int] = []
    waiters = [threading.Thread(target=lambda: got.append(fut.result(10))) for _ in range(8)]
    for t in waiters:
        t.start()
    fut.set_result(42)
    for t in waiters:
        t.join(10)
    assert got == [42] * 8
    assert fut.done() and fut.exception() is None


def test_a_failure_is_raised_to_waiters_and_returned_by_exception() -> None:
    fut = CommitFuture()
    fut.set_exception(NotLeader("b"))
    with pytest.raises(NotLeader) as raised:
        fut.result(1)
    assert raised.value.leader == "b"
    assert isinstance(fut.exception(), NotLeader)


def test_result_times_out_while_unresolved() -> None:
    with pytest.raises(TimeoutError):
        CommitFuture().result(0.01)


def test_callbacks_run_once_whether_added_before_or_after_resolution() -> None:
    fut = CommitFuture()
    calls: list[str] = []
    fut.add_done_callback(lambda f: calls.append(f"before {f.result()}"))
    fut.set_result(7)
    fut.add_done_callback(lambda f: calls.append(f"after {f.result()}"))
    assert calls == ["before 7", "after 7"]


def test_a_raising_callback_does_not_stop_the_others_or_the_resolver() -> None:
    fut = CommitFuture()
    calls: list[int] = []
    fut.add_done_callback(lambda f: 1 / 0)
    fut.add_done_callback(lambda f: calls.append(f.result()))
    fut.set_result(3)
    assert calls == [3]


def test_resolving_twice_is_an_internal_error() -> None:
    fut = CommitFuture()
    fut.set_result(1)
    with pytest.raises(RuntimeError):
        fut.set_result(2)


def _add_callbacks(fut: CommitFuture, calls: list[int], count: int) -> None:
    for _ in range(count):
        fut.add_done_callback(lambda f: calls.append(1))


def test_callbacks_added_while_resolving_from_another_thread_all_run() -> None:
    for _ in range(200):
        fut = CommitFuture()
        calls: list[int] = []
        adder = threading.Thread(target=_add_callbacks, args=(fut, calls, 50))
        adder.start()
        fut.set_result(0)
        adder.join(10)
        assert len(calls) == 50
