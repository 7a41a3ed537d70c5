"""The writer fork server (acqd.record.forkserver): a forked writer runs its spec and ends as an exec'd one did, as
``subprocess.Popen`` would report it; writers end with their server, and a server that died is replaced."""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest
import zmq

from acqd.config import StreamConfig
from acqd.record.forkserver import FORK_FAILS_ENV, LOST, Forked, ForkServer, ForkServerError, pid_alive
from acqd.record.writer import WriterSpec
from tests.conftest import parent_of


class Control:
    """The supervisor's side of forked writers: their control socket, and the spec of a stream on it."""

    def __init__(self, tmp: Path):
        self.tmp, self.ctx = tmp, zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"ipc://{tmp}/c")
        (tmp / "streams").mkdir()
        self.ready: set[int] = set()

    def spec(self, name: str) -> str:
        cfg = StreamConfig.model_validate({"name": name, "endpoint": f"ipc://{self.tmp}/{name}", "socket": "pull",
                                           "dtype": "int16", "shape": (4,), "rate": 1000.0})
        return WriterSpec(stream=cfg, lines=[], control=f"ipc://{self.tmp}/c", flush_interval_s=0.05,
                          fsync_interval_s=0.0, stats_interval_s=0.1, clock_pair_interval_s=0.5).to_json()

    def wait_ready(self, w: Forked, timeout_s: float = 30.0) -> None:
        """Until writer ``w`` says it is ready (it runs its spec, in its own process)."""
        deadline = time.monotonic() + timeout_s
        while w.pid not in self.ready:
            assert time.monotonic() < deadline and w.poll() is None, f"writer {w.pid} never ready ({w.poll()})"
            if self.router.poll(100):
                msg = zmq.utils.jsonapi.loads(self.router.recv_multipart()[1])
                if msg.get("type") == "ready":
                    self.ready.add(msg["pid"])

    def close(self) -> None:
        self.router.close()
        self.ctx.term()


@pytest.fixture
def control(tmp_path):
    c = Control(tmp_path)
    yield c
    c.close()


@pytest.fixture
def forks():
    server = ForkServer()
    yield server
    server.close()


def test_forked_writers_run_their_specs_and_end_as_popen_reports_it(control, forks):
    a, b = forks.fork(control.spec("a")), forks.fork(control.spec("b"))
    control.wait_ready(a)
    control.wait_ready(b)
    server = forks.server.proc.pid
    assert parent_of(a.pid) == parent_of(b.pid) == server != os.getpid()
    assert f"acqd.record.forkserver {os.getpid()} " in Path(f"/proc/{a.pid}/cmdline").read_text().replace("\0", " ")
    a.kill()
    assert a.wait(20) == -signal.SIGKILL and a.returncode == a.poll() == -signal.SIGKILL
    assert b.poll() is None and b.returncode is None
    b.terminate()  # a writer closes and exits on SIGTERM
    assert b.wait(20) == 0
    broken = forks.fork('{"stream": {}}')  # an exec'd writer would print the traceback and exit 1
    assert broken.wait(20) == 1
    assert forks.server.proc.pid == server  # one server forked them all


def test_writers_end_with_their_server_and_the_next_fork_starts_a_new_one(control, forks):
    w = forks.fork(control.spec("a"))
    control.wait_ready(w)
    first = forks.server.proc.pid
    os.kill(first, signal.SIGKILL)
    assert w.wait(20) == LOST and not pid_alive(w.pid)  # it got SIGTERM with its server (and closed)
    again = forks.fork(control.spec("b"))
    control.wait_ready(again)
    assert forks.server.proc.pid != first and parent_of(again.pid) == forks.server.proc.pid
    again.terminate()
    assert again.wait(20) == 0


def test_the_server_ends_when_the_supervisor_closes_it(control, forks):
    w = forks.fork(control.spec("a"))
    control.wait_ready(w)
    w.terminate()
    assert w.wait(20) == 0
    proc = forks.server.proc
    forks.close()
    assert proc.returncode == 0 and forks.server is None


def test_a_writer_s_end_wakes_whoever_waits_on_the_server_s_socket(control, forks):
    w = forks.fork(control.spec("a"))
    control.wait_ready(w)
    fd = forks.fileno()
    assert fd is not None and not select.select([fd], [], [], 0)[0] and not forks.hear()
    w.kill()
    assert select.select([fd], [], [], 20)[0], "no news of the writer's end"
    assert forks.hear() and w.returncode == -signal.SIGKILL  # heard: known without polling the handle


def test_a_fork_that_fails_fails_alone_and_the_writers_running_go_on(control, monkeypatch):
    monkeypatch.setenv(FORK_FAILS_ENV, "2")  # read by the server it starts: its second fork and later ones fail
    forks = ForkServer()
    try:
        w = forks.fork(control.spec("a"))
        control.wait_ready(w)
        server = forks.server.proc.pid
        with pytest.raises(ForkServerError, match="could not fork: .*Resource temporarily unavailable"):
            forks.fork(control.spec("b"))
        assert forks.server.proc.pid == server and w.poll() is None  # the same server, its writer untouched
        w.terminate()
        assert w.wait(20) == 0
    finally:
        forks.close()
