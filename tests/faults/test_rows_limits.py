"""Fault-matrix row 46 (/work/shared/fault-matrix.md): resource exhaustion from a local client. Idle and
trickling sockets, and event-stream subscribers that never read, against a real daemon over real sockets;
the console and the API stay reachable throughout (issue 22 defects 7, 8 and 13)."""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from acqd.service.http.events import MAX_LISTENERS
from acqd.service.procs import wait_until
from tests.conftest import write_rig

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _enough_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _addr(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname, u.port


def _connect(addr: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:  # before connect, so that the window it advertises stays small: the server's sends block soon
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(addr)
    return s


def _subscribe(addr: tuple[str, int], last_id: bytes | None = None, rcvbuf: int | None = None) -> socket.socket:
    s = _connect(addr, rcvbuf)
    extra = b"Last-Event-ID: " + last_id + b"\r\n" if last_id is not None else b""
    s.sendall(b"GET /api/events HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" % (addr[0].encode(), addr[1], extra))
    return s


def _status_line(s: socket.socket, timeout_s: float = 10.0) -> int:
    s.settimeout(timeout_s)
    line = s.recv(64).split(b"\r\n", 1)[0]
    return int(line.split()[1])


def _closed_by_peer(s: socket.socket) -> bool:
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return s.recv(4096) == b""
    except OSError:
        return True


def _console_reachable(url: str) -> None:
    """Fresh connections, as a browser opening the console makes them: page, status, every time at once."""
    for _ in range(5):
        with httpx.Client(base_url=url, timeout=5) as http:
            assert http.get("/").status_code == 200
            assert http.get("/api/status").status_code == 200


def test_row46_600_idle_sockets_do_not_lock_out_the_console(tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"request_timeout_s": 3}}))
    addr = _addr(daemon.url)
    idle = [_connect(addr) for _ in range(600)]  # was: 503 for everyone from the 512th on, for as long as they stay
    for s in idle[:100]:
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127")  # a trickle: headers never completed
    for s in idle[100:150]:  # a body that never completes: the request is in flight, yet the client is the slow end
        s.sendall(b"POST /api/commands/annotate HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{" % (addr[0].encode(), addr[1]))
    try:
        _console_reachable(daemon.url)
        t0 = time.monotonic()
        wait_until(lambda: all(_closed_by_peer(s) for s in idle), "the server to close every idle socket", 20)
        assert time.monotonic() - t0 < 3 + 5  # the request timeout, not the client's patience
        _console_reachable(daemon.url)
    finally:
        for s in idle:
            s.close()
    assert daemon.command("status")["mode"] == "IDLE"


def test_row46_200_event_subscribers_are_capped_and_silent_ones_dropped(tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"stall_timeout_s": 2}}))
    addr = _addr(daemon.url)
    daemon.command("acquire")
    # 200 at once: exactly the limit accepted (was 200, 62 or 21 of 200)
    burst = [_subscribe(addr) for _ in range(200)]
    codes = [_status_line(s) for s in burst]
    assert codes.count(200) == MAX_LISTENERS and codes.count(503) == 200 - MAX_LISTENERS, sorted(set(codes))
    for s in burst:
        s.close()
    # the slots taken by clients that never read are given back; the one that reads is told
    watcher = wait_until(lambda: _accepted(addr), "a free slot", 10)
    silent = [_subscribe(addr, rcvbuf=1024) for _ in range(MAX_LISTENS_SILENT)]
    try:
        assert _status_line(_subscribe(addr)) == 503  # every slot is taken now
        _console_reachable(daemon.url)
        seen = bytearray()
        reader = threading.Thread(target=_read_all, args=(watcher, seen), daemon=True)
        reader.start()
        deadline = time.monotonic() + 25
        while seen.count(b"event_stream_dropped") < MAX_LISTENS_SILENT:
            assert time.monotonic() < deadline, f"{seen.count(b'event_stream_dropped')} silent subscribers dropped"
            # ~1.7 MB fill a silent subscriber's socket buffers on loopback; then its sends block
            daemon.command("annotate", text="x" * 10_000)
        fresh = wait_until(lambda: _accepted(addr), "a slot for a new subscriber", 10)
        fresh.close()
        _console_reachable(daemon.url)
    finally:
        watcher.close()
        for s in silent:
            s.close()
    assert daemon.command("status")["mode"] == "ACQUIRE"


def test_row46_an_unparsable_last_event_id_is_no_id(tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path))
    addr = _addr(daemon.url)
    daemon.command("acquire")
    daemon.command("annotate", text="before")
    # was: 500 and a logged traceback for 5000 digits (int() refuses > 4300) and for '\xb2' ('²'.isdigit())
    for bad in (b"9" * 5000, b"\xb2", b"\xc3\xa9", b"-1", b"1e3", b" 1"):
        s = _subscribe(addr, bad)
        try:
            assert _status_line(s) == 200, bad[:8]
        finally:
            s.close()
    s = _subscribe(addr, b"0")  # a valid id still replays what followed it
    try:
        seen = bytearray()
        wait_until(lambda: seen.extend(s.recv(1 << 16)) or b"before" in seen, "the replayed annotation", 10)
    finally:
        s.close()


MAX_LISTENS_SILENT = MAX_LISTENERS - 1
"""Subscribers that never read: every slot but the watcher's."""


def _accepted(addr: tuple[str, int], last_id: bytes | None = None) -> socket.socket | None:
    s = _subscribe(addr, last_id)
    if _status_line(s) == 200:
        return s
    s.close()
    return None


def _read_all(s: socket.socket, into: bytearray) -> None:
    s.settimeout(30)
    try:
        while chunk := s.recv(1 << 16):
            into.extend(chunk)
    except OSError:
        pass
