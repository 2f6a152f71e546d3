"""The future ``Replica.propose`` returns: the subset of ``concurrent.futures.Future`` that a
proposer uses, with one lock per future.

A leader resolves one future per commit, and a proposing thread waits on one. The standard
future builds a Condition (an RLock and a new lock per wait) and costs about 2.5 µs more to
resolve and 13 µs more CPU per cross-thread wake-up here; at 10,000 commits/s that is a tenth
of the leader's CPU. A waiter here sleeps on the future's own lock, which the setter releases.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_callbacks_mu = threading.Lock()


class CommitFuture:
    __slots__ = ("_ready", "_done", "_result", "_exc", "_callbacks")

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[CommitFuture], object]] | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._result = result
        self._finish()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._finish()

    def _finish(self) -> None:
        with _callbacks_mu:
            if self._done:
                raise RuntimeError("CommitFuture resolved twice")
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
        self._ready.release()
        for fn in callbacks or ():
            self._run(fn)

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if not self._ready.acquire(True, -1 if timeout is None else timeout):
            raise TimeoutError(f"not committed within {timeout} s")
        self._ready.release()  # the next waiter, if any

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exc

    def add_done_callback(self, fn: Callable[[CommitFuture], object]) -> None:
        """``fn(future)`` runs once resolved: on the resolving thread, or now if already done."""
        with _callbacks_mu:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._run(fn)

    def _run(self, fn: Callable[[CommitFuture], object]) -> None:
        try:
            fn(self)
        except Exception:  # as concurrent.futures does: a callback cannot break the resolver
            log.exception("callback %r of a commit future raised", fn)
