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
                      exit PID CODE    PID ended; CODE as ``subprocess.Popen.returncode`` (-N: killed by signal N)

The supervisor's side is ``ForkServer``; its ``Forked`` handles stand where ``subprocess.Popen`` stood. If the
server dies, its writers end with it: each of their handles ends with ``LOST`` once its process is gone, and the
next fork starts a new server.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

from acqd.record.launch import EXIT_ORPHANED, die_with_parent

LOST = 256
"""The return code of a writer whose server died: how it ended is unknown (no exit status is 256)."""
FORK_TIMEOUT_S = 60.0
"""How long a fork waits for its pid: the first fork of a server waits for its imports (~0.3 s of CPU)."""
log = logging.getLogger("acqd")


class ForkServerError(RuntimeError):
    """The fork server did not fork a writer."""


class ForkServer:
    """The supervisor's side: forks writers, starting a server when there is none (or it died)."""

    def __init__(self) -> None:
        self.server: Server | None = None

    def fork(self, spec: str) -> Forked:
        """A new writer process running ``spec``."""
        for attempt in (1, 2):
            if self.server is not None and not self.server.running():
                log.error("the writer fork server (pid %d) died; its writers end with it, a new server forks "
                          "their replacements", self.server.proc.pid)
                self.server.close()
                self.server = None
            if self.server is None:
                self.server = Server()
            try:
                return self.server.fork(spec)
            except (OSError, ForkServerError) as e:
                if attempt == 2:
                    raise ForkServerError(f"the writer fork server did not fork: {e}") from e
                self.server.close()  # a server that cannot fork is replaced, once
                self.server = None
        raise AssertionError("unreachable")

    def fileno(self) -> int | None:
        """The socket the server's news arrive on, to wait on with others (None: no server to hear from)."""
        return None if self.server is None or self.server.closed else self.server.sock.fileno()

    def hear(self) -> bool:
        """Take the server's news, if any: True when a writer has ended (or the server has gone)."""
        return self.server is not None and self.server.hear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Server:
    """One fork server process, and what it said of the writers it forked."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock, self.buf, self.closed = ours, b"", False
        self.forked: list[int] = []  # pids, in the order of the forks asked for
        self.codes: dict[int, int] = {}  # pid -> how it ended
        self.lock = threading.Lock()  # the supervisor thread polls; the status read of a handle may come from another

    def running(self) -> bool:
        return not self.closed and self.proc.poll() is None

    def fork(self, spec: str) -> Forked:
        n = len(self.forked)
        self.sock.sendall(spec.encode() + b"\n")
        deadline = time.monotonic() + FORK_TIMEOUT_S
        with self.lock:
            while len(self.forked) == n:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise ForkServerError("it closed its socket" if self.closed else "no pid came back")
                self._read(min(left, 1.0))
        return Forked(self, self.forked[n])

    def hear(self) -> bool:
        with self.lock:
            ended = len(self.codes)
            if not self.closed:
                self._read(0)
            return len(self.codes) > ended or self.closed

    def returncode(self, pid: int, poll: bool) -> int | None:
        """How writer ``pid`` ended, None while it runs; ``poll`` reads the server's news first."""
        with self.lock:
            if poll and pid not in self.codes:
                if not self.closed:
                    self._read(0)
                if self.closed and not pid_alive(pid):  # the server is gone: so is how the writer ended
                    self.codes[pid] = LOST
            return self.codes.get(pid)

    def _read(self, timeout_s: float) -> None:
        """Take what the server said within ``timeout_s`` (under ``lock``)."""
        if not select.select([self.sock], [], [], timeout_s)[0]:
            return
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            kind, *values = line.split()
            if kind == b"pid":
                self.forked.append(int(values[0]))
            elif kind == b"exit":
                self.codes[int(values[0])] = int(values[1])

    def close(self) -> None:
        """End the server: it exits when its socket closes (its writers, if any still run, get SIGTERM)."""
        with self.lock:
            while not self.closed and select.select([self.sock], [], [], 0)[0]:
                self._read(0)  # the ends it reported before it went
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

    @property
    def returncode(self) -> int | None:
        return self.server.returncode(self.pid, poll=False)

    def poll(self) -> int | None:
        return self.server.returncode(self.pid, poll=True)

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
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # handled, so that each SIGCHLD writes to the wakeup fd
    server, buf = os.getpid(), b""
    try:
        while True:
            ready = select.select([sock, wake_r], [], [])[0]
            if wake_r in ready:
                os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if not pid:
                        break
                    sock.sendall(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return 0  # the supervisor is done with us
                *specs, buf = (buf + data).split(b"\n")
                for spec in specs:
                    pid = os.fork()
                    if pid == 0:
                        sock.close()
                        for fd in (wake_r, wake_w):
                            os.close(fd)
                        os._exit(child(spec.decode(), server))
                    sock.sendall(f"pid {pid}\n".encode())
    except OSError:  # the supervisor went away mid-reply: we go too (and our writers with us)
        return 0


def child(spec: str, server: int) -> int:
    """A forked writer: tie its life to the server's, then run it; its exit code."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        die_with_parent()
        if os.getppid() != server:
            print(f"acqd writer: the fork server (pid {server}) is gone; exiting", file=sys.stderr, flush=True)
            return EXIT_ORPHANED
        from acqd.record.launch import run

        return run(spec)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
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
    die_with_parent()
    if os.getppid() != daemon:
        return EXIT_ORPHANED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    from acqd.startup import importing

    with importing():  # what every writer needs, imported once for all of them
        import acqd.record.group  # noqa: F401
        import acqd.record.writer  # noqa: F401
    return serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    sys.exit(main())
