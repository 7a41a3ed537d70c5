"""The writer fork server: one process imports the writer once, and forks every writer of the daemon from itself.

A writer started as ``python -m`` spent ~0.3 s of CPU importing numpy, h5py, zmq and the config models before it
could open its part: at every start, and at every restart after a crash while its SUB stream's messages went to a
gap. The supervisor instead starts this server (``python -m acqd.record.forkserver DAEMON_PID FD``) and asks it for
each writer: the server forks, and the child runs the writer (``acqd.record.launch.run``) with everything already
imported. The server never makes a ZeroMQ context, a thread or a file, so a child starts as clean as an exec'd
writer; what the server imported is frozen out of the garbage collector's walks (``acqd.startup``).

Lifetimes chain as before: the server dies with the daemon and each writer with the server (``PR_SET_PDEATHSIG``;
on SIGTERM a writer closes its file), and a writer whose server is gone before it could ask exits
``EXIT_ORPHANED``. The server reaps its children and tells the supervisor over a Unix socket pair (``FD``), a line
per event::

    to the server     SPEC_JSON        a writer's spec, as ``python -m acqd.record.launch`` takes it
    from the server   pid PID          the writer forked for it
                      error WHY        no writer: the fork failed (the writers already running go on)
                      exit PID CODE    PID ended; CODE as ``subprocess.Popen.returncode`` (-N: killed by signal N)

The supervisor's side is ``ForkServer``; its ``Forked`` handles stand where ``subprocess.Popen`` stood. If the
server dies, its writers end with it: each of their handles ends with ``LOST`` once its process is gone, and the
next fork starts a new server. Used from one thread (the supervisor's): no call blocks much longer than
``FORK_TIMEOUT_S``, well within systemd's watchdog: a server that does not answer is killed, and forks fail at once
for as long again.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator

from acqd.record.launch import EXIT_ORPHANED, run, tie_to_parent

LOST = 256
"""The return code of a writer whose server died: how it ended is unknown (no exit status is 256)."""
FORK_TIMEOUT_S = 20.0
"""How long a fork waits for its pid: the first fork of a server waits for its imports (~0.3 s of CPU)."""
FORK_FAILS_ENV = "ACQD_FORKSERVER_FAIL_FROM"
"""A test hook, read by the server only: from the Nth fork it is asked for on, fail it (as os.fork's EAGAIN)."""
log = logging.getLogger("acqd")


class ForkServerError(RuntimeError):
    """No writer was forked: the fork failed, or the server did not answer."""


class ForkFailed(ForkServerError):
    """The server answered that the fork failed."""


class ForkTimeout(ForkServerError):
    """The server did not answer within FORK_TIMEOUT_S."""


class ForkServer:
    """The supervisor's side: forks writers, starting a server when there is none (or it died)."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.unanswered_until = 0.0  # after a fork that timed out, forks fail at once until then

    def fork(self, spec: str) -> Forked:
        """A new writer process running ``spec``; raises ForkServerError when none could be forked."""
        for attempt in (1, 2):
            if self.server is not None and not self.server.running():
                log.error("the writer fork server (pid %d) died; its writers end with it, a new server forks "
                          "their replacements", self.server.proc.pid)
                self.close()
            if time.monotonic() < self.unanswered_until:
                raise ForkServerError("the writer fork server did not answer a moment ago; not asking again yet")
            if self.server is None:
                try:
                    self.server = Server()
                except OSError as e:
                    raise ForkServerError(f"the writer fork server could not start: {e}") from e
            try:
                return self.server.fork(spec)
            except ForkFailed as e:  # the server is fine, the fork was not: nothing to replace
                raise ForkServerError(f"the writer fork server could not fork: {e}") from e
            except ForkTimeout as e:  # never waited for twice in a row: the supervisor's watchdog must go on
                self.server.proc.kill()
                self.close()
                self.unanswered_until = time.monotonic() + FORK_TIMEOUT_S
                raise ForkServerError(f"the writer fork server did not answer: {e}") from e
            except (OSError, ForkServerError) as e:  # it went away: a new one, once
                if attempt == 2:
                    raise ForkServerError(f"the writer fork server went away: {e}") from e
                log.error("the writer fork server (pid %d) went away (%s); starting a new one",
                          self.server.proc.pid, e)
                self.close()
        raise AssertionError("unreachable")

    def fileno(self) -> int | None:
        """The socket the server's news arrive on, to wait on with others (None: no server to hear from)."""
        return None if self.server is None or self.server.closed else self.server.sock.fileno()

    def hear(self) -> bool:
        """Take the server's news: True when a writer has ended (or the server has gone) since the last call."""
        return self.server is not None and self.server.hear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Server:
    """One fork server process, and what it said of the writers it forked."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.buf, self.closed = ours, b"", False
        self.answers: list[int | str] = []  # to the forks asked for, in order: a pid, or why it failed
        self.codes: dict[int, int] = {}  # pid -> how it ended
        self.ended = False  # a writer ended (or the server went) since ``hear`` last looked

    def running(self) -> bool:
        return not self.closed and self.proc.poll() is None

    def fork(self, spec: str) -> Forked:
        self.sock.sendall(spec.encode() + b"\n")
        deadline = time.monotonic() + FORK_TIMEOUT_S
        while not self.answers:
            left = deadline - time.monotonic()
            if self.closed:
                raise ForkServerError("it closed its socket")
            if left <= 0:
                raise ForkTimeout(f"no answer in {FORK_TIMEOUT_S:g} s")
            self._read(min(left, 1.0))
        answer = self.answers.pop(0)
        if isinstance(answer, str):
            raise ForkFailed(answer)
        return Forked(self, answer)

    def hear(self) -> bool:
        if not self.closed:
            self._read(0)
        ended, self.ended = self.ended or self.closed, False
        return ended

    def returncode(self, pid: int, poll: bool) -> int | None:
        """How writer ``pid`` ended, None while it runs; ``poll`` reads the server's news first."""
        if poll and pid not in self.codes:
            if not self.closed:
                self._read(0)
            if self.closed and not pid_alive(pid):  # the server is gone: so is how the writer ended
                self.codes[pid] = LOST
        return self.codes.get(pid)

    def _read(self, timeout_s: float) -> bool:
        """Take what the server said within ``timeout_s``; whether it said anything."""
        poller = select.poll()  # (not select.select: a daemon may hold more than 1024 files)
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(timeout_s * 1000):
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:  # it died with our data unread
            data = b""
        if not data:
            self.closed = True
            return False
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            kind, _, rest = line.decode(errors="replace").partition(" ")
            if kind == "pid":
                self.answers.append(int(rest))
                self.codes.pop(int(rest), None)  # an earlier writer's pid, reused
            elif kind == "error":
                self.answers.append(rest)
            elif kind == "exit":
                pid, code = rest.split()
                self.codes[int(pid)], self.ended = int(code), True
        return True

    def close(self) -> None:
        """End the server: it exits when its socket closes (its writers, if any still run, get SIGTERM)."""
        while not self.closed and self._read(0):
            pass  # the ends it reported before it went
        self.closed = True
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forked:
    """A writer forked by the server: the part of ``subprocess.Popen``'s interface the supervisor uses."""

    def __init__(self, server: Server, pid: int):
        self.server, self.pid = server, pid
        self.code: int | None = None

    @property
    def returncode(self) -> int | None:
        if self.code is None:
            self.code = self.server.returncode(self.pid, poll=False)
        return self.code

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.server.returncode(self.pid, poll=True)
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"writer (pid {self.pid})", timeout or 0.0)
            time.sleep(0.01)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the server process ------------------------------------------------------------------------------
def serve(sock: socket.socket) -> int:
    """Fork a writer for each spec line and report its pid, report each one's end, until the socket closes."""
    wake_r, wake_w = woken_by_children()
    server, buf, asked = os.getpid(), b"", 0
    fail_from = int(os.environ.get(FORK_FAILS_ENV) or 0)
    poller = select.poll()  # (not select.select: the socket keeps the daemon's descriptor number, maybe > 1024)
    for fd in (sock.fileno(), wake_r):
        poller.register(fd, select.POLLIN)
    try:
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if wake_r in ready:
                os.read(wake_r, 4096)
                for pid, code in reaped():
                    sock.sendall(f"exit {pid} {code}\n".encode())
            if sock.fileno() in ready:
                data = sock.recv(65536)
                if not data:
                    return 0  # the supervisor is done with us
                *specs, buf = (buf + data).split(b"\n")
                for spec in specs:
                    asked += 1
                    try:
                        if fail_from and asked >= fail_from:
                            raise BlockingIOError(11, "Resource temporarily unavailable (the test hook)")
                        pid = os.fork()
                    except OSError as e:  # a pid or memory limit: this writer only, the others go on
                        sock.sendall(f"error {e}\n".encode())
                        continue
                    if pid == 0:
                        os._exit(child(spec.decode(), server, sock, (wake_r, wake_w)))
                    sock.sendall(f"pid {pid}\n".encode())
    except (BrokenPipeError, ConnectionResetError):  # the supervisor went: so do we (and our writers with us)
        return 0


def woken_by_children() -> tuple[int, int]:
    """A pipe whose read end turns readable each time a child ends (SIGCHLD through Python's wakeup fd): wait on it
    beside the sockets, then take ``reaped()``. A child closes both ends (after ``signal.set_wakeup_fd(-1)``)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # handled, so that each SIGCHLD writes to the wakeup fd
    return wake_r, wake_w


def reaped() -> Iterator[tuple[int, int]]:
    """Each child that has ended, with its exit code as ``subprocess.Popen.returncode`` gives it; never waits."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def child(spec: str, server: int, sock: socket.socket, pipe: tuple[int, int]) -> int:
    """A forked writer: drop the server's descriptors, tie its life to the server's, run it; its exit code."""
    try:
        signal.set_wakeup_fd(-1)  # before its pipe closes: a signal would write to a closed (or reused) fd
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in pipe:
            os.close(fd)
        if not tie_to_parent(server):
            print(f"acqd writer: the fork server (pid {server}) is gone; exiting", file=sys.stderr, flush=True)
            return EXIT_ORPHANED
        return run(spec)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as an exec'd writer would: the traceback on stderr, exit code 1
        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def main(argv: list[str] | None = None) -> int:
    daemon, fd = (int(a) for a in (argv or sys.argv[1:])[:2])
    if not tie_to_parent(daemon):
        return EXIT_ORPHANED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    from acqd.startup import importing

    with importing():  # what every writer needs, imported once for all of them
        import acqd.record.group  # noqa: F401 (and acqd.record.writer with it)
    return serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    sys.exit(main())
