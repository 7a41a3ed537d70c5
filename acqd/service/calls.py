"""Work other threads hand to the supervisor thread: ``call`` runs a function there and returns its result.

The supervisor thread owns every socket and process handle, so no lock guards its state; the HTTP API's threads
submit commands here instead. A pipe wakes the supervisor's poll at once when a call arrives (``wake_fd``).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Calls:
    def __init__(self) -> None:
        self._calls: queue.Queue = queue.Queue()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Any thread: run ``fn(*args)`` on the supervisor thread and return its result (or raise its error)."""
        fut: Future = Future()
        self._calls.put((fn, args, fut))
        os.write(self._wake_w, b"x")
        return fut.result(timeout)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Any thread: queue ``fn(*args)`` for the supervisor thread and return at once (its result is dropped)."""
        self._calls.put((fn, args, Future()))
        os.write(self._wake_w, b"x")

    def woken(self) -> None:
        """Supervisor thread, after its poll saw ``wake_fd``: empty the pipe."""
        try:
            os.read(self.wake_fd, 4096)
        except BlockingIOError:
            pass

    def run_pending(self, after_each: Callable[[], Any]) -> None:
        """Supervisor thread: run every submitted call, then ``after_each()`` (the status snapshot), then hand its
        result or error to its caller. In that order: a caller that reads the status once its command returned must
        see the command's effect (a client that read it at once still saw RECORD after an aborted rig start)."""
        while True:
            try:
                fn, args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    result, error = fn(*args), None
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    result, error = None, e
                try:
                    after_each()
                finally:
                    if error is None:
                        fut.set_result(result)
                    else:
                        fut.set_exception(error)
