"""Work handed to the supervisor thread (unit): it runs there, its result or error goes back to the caller."""

from __future__ import annotations

import select
import threading

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
