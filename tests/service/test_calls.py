"""Work handed to the supervisor thread (unit): it runs there, its result or error goes back to the caller."""

from __future__ import annotations

import select
import threading
import time

import pytest

from acqd.service.calls import Calls


def test_a_call_runs_on_the_serving_thread_and_returns_or_raises():
    calls, ran_on, after = Calls(), [], []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if select.select([calls.wake_fd], [], [], 0.05)[0]:
                calls.woken()
            calls.run_pending(lambda: after.append(1))

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert calls.call(lambda a, b: (ran_on.append(threading.current_thread()), a + b)[1], 2, 3, timeout=10) == 5
        with pytest.raises(ZeroDivisionError):
            calls.call(lambda: 1 / 0, timeout=10)
    finally:
        stop.set()
        server.join(10)
    assert ran_on == [server] and after == [1, 1]


def test_a_caller_sees_what_runs_after_its_call_once_it_returns():
    """``after_each`` (the supervisor publishes the status snapshot there) runs before the caller gets its result or
    error: a client that reads the status right after its command returned sees the command's effect. Before, the
    caller was woken first and could read the old snapshot (a leader still in RECORD after an aborted rig start)."""
    calls, published = Calls(), []
    stop = threading.Event()

    def publish() -> None:
        time.sleep(0.2)  # a snapshot that takes a while to build
        published.append(1)

    def serve() -> None:
        while not stop.is_set():
            if select.select([calls.wake_fd], [], [], 0.05)[0]:
                calls.woken()
            calls.run_pending(publish)

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert calls.call(lambda: "stopped", timeout=10) == "stopped"
        assert published == [1], "the caller was answered before the snapshot was published"
        with pytest.raises(ZeroDivisionError):
            calls.call(lambda: 1 / 0, timeout=10)
        assert published == [1, 1]
    finally:
        stop.set()
        server.join(10)
