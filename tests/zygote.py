"""The tests' acqd processes forked from one that has imported acqd once: daemons, simulators, CLI runs, writers.

Every ``python -m acqd...`` a test starts would first import what it needs: a daemon FastAPI, pydantic and pandas,
then pynwb and nwbinspector at ACQUIRE (about 1.4 s of CPU in all); a simulator numpy and zmq; a ``finalize`` or
``export`` run the NWB stack; a writer numpy, h5py and zmq. Each pytest worker instead starts one zygote
(``python -m tests.zygote``) that imports all of it once, then forks each such process from itself: the child takes
the test's argv, environment, working folder and standard streams, runs the module as ``-m`` does (``runpy``) and
exits as a fresh interpreter would (threads joined, ``atexit`` run, streams flushed). It is a real, separate process
with its own pid, signals, sockets and files, the worker's umask and open-file limit. What differs from an exec'd
one: its imports were done beforehand (a variable read at import would keep the worker's value: acqd reads its own
when used); its parent is the zygote (a daemon's jobs are not its children); ``/proc/PID/cmdline`` is the zygote's
(``comm`` is ``acqd COMMAND``); every child has the zygote's string-hash seed. What a forked child starts through
``acqd.service.procs.popen`` (a daemon's finalize and export runs) is forked by the zygote too, and a child started
under ``ip netns exec NS`` (a PC of a multi-PC test rig) enters that network namespace itself.

What is not a plain ``python -m acqd.MODULE`` still starts as one (``subprocess.Popen``): interpreter options (``-X``,
``PYTHON*`` variables that differ from the worker's), descriptors passed to it, other programs. The tests of
start-up itself use those.

The zygote is its children's parent and reaps them; it reports to whoever asked, over a ``SOCK_SEQPACKET`` socket
pair each (the worker's, and one per child for what that child starts), a message per event::

    to the zygote    JSON {argv, netns, env, cwd}, with stdin, stdout and stderr as SCM_RIGHTS descriptors
    from it          pid PID | error WHY | exit PID CODE  (CODE as subprocess.Popen.returncode)

``Child`` is the handle: ``subprocess.Popen``, pipes and ``communicate`` included.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import resource
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from acqd.record.forkserver import reaped, woken_by_children

ROOT = Path(__file__).resolve().parent.parent
PYTHON_M = [sys.executable, "-m"]
NETNS_EXEC = ["ip", "netns", "exec"]
"""A command's prefix that runs it in a network namespace (a PC of a multi-PC test rig, tests/multipc/netns.py)."""
CLONE_NEWNET = 0x40000000
PR_SET_NAME = 15
"""A forked child names itself ``acqd COMMAND`` (``ps -o comm``, ``top``): its command line is the zygote's."""


class Zygote:
    """A connection to the zygote, and what it said of the children it forked for it (thread-safe): the worker's,
    which started the zygote (``proc``), or a forked child's own, for the processes that child starts."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen | None = None) -> None:
        self.sock, self.proc, self.lock = sock, proc, threading.Lock()
        self.answers: list[str] = []
        self.running: dict[int, list[int | None]] = {}  # pid -> [its exit code, once it ended], per fork

    @classmethod
    def start(cls) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # no BLAS threads in a process that forks
        proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", str(theirs.fileno())], cwd=ROOT, env=env,
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        return cls(ours, proc)

    def fork(self, request: dict, fds: list[int]) -> tuple[int, list[int | None]]:
        """A child running ``request`` (``become``) with ``fds`` as its stdin, stdout and stderr: its pid, and the
        record its exit code comes to (a pid is reused once its process is reaped, a record never)."""
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            while not self.answers:
                if not self._read(60.0):
                    self.sock.close()  # its answer, if it comes, must not be taken for the next fork's
                    raise RuntimeError("the test zygote did not answer within 60 s")
            kind, _, rest = self.answers.pop(0).partition(" ")
            if kind != "pid":
                raise OSError(f"the test zygote could not fork: {rest}")
            ended = self.running[int(rest)] = [None]
        return int(rest), ended

    def wait(self, ended: list[int | None], timeout_s: float = 0.0) -> int | None:
        """The exit code in ``ended`` (from ``fork``), taking the zygote's news for up to ``timeout_s``; None while
        the process runs."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while ended[0] is None and self._read(deadline - time.monotonic()):
                pass
            return ended[0]

    def _read(self, timeout_s: float) -> bool:
        if not select.select([self.sock], [], [], max(timeout_s, 0.0))[0]:
            return False
        message = self.sock.recv(4096).decode()
        if not message:
            raise RuntimeError("the test zygote died")
        if message.startswith("exit "):  # (always after its "pid": the zygote reaps what it has forked)
            _, pid, code = message.split()
            self.running.pop(int(pid))[0] = int(code)
        else:
            self.answers.append(message)
        return True

    def close(self) -> None:
        self.sock.close()  # the zygote exits when the worker's socket closes
        if self.proc is None:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Child(subprocess.Popen):
    """A process forked by the zygote, with ``subprocess.Popen``'s interface (its pipes and ``communicate``
    included): Popen's own methods (``send_signal`` polls first) run on top of the ``_wait`` and ``_internal_poll``
    below."""

    def __init__(self, zygote: Zygote, args: list[str], module: str, argv: list[str], netns: str | None, *,
                 stdin=None, stdout=None, stderr=None, text: bool = False, env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        # Popen's __init__ forks and execs; what it sets besides, set here: the attributes its methods read
        self.args, self.zygote, self.returncode = args, zygote, None
        self._waitpid_lock, self._input, self._communication_started = threading.Lock(), None, False
        self._sigint_wait_secs, self._closed_child_pipe_fds = 0.25, True
        self.text_mode = self.universal_newlines = bool(text)
        self.encoding = self.errors = None
        self.pipesize, self._child_created = -1, True
        self.stdin = self.stdout = self.stderr = None
        ours: list[tuple[str, int, str]] = []  # (attribute, our end, mode) of each pipe
        theirs: list[int] = []
        for name, spec, mode in (("stdin", stdin, "wb"), ("stdout", stdout, "rb"), ("stderr", stderr, "rb")):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                ours.append((name, w if name == "stdin" else r, mode))
                theirs.append(r if name == "stdin" else w)
            elif spec == subprocess.DEVNULL:
                theirs.append(os.open(os.devnull, os.O_RDWR))
            elif spec == subprocess.STDOUT:
                theirs.append(theirs[1])
            elif spec is None:
                theirs.append(os.dup((0, 1, 2)[len(theirs)]))
            else:
                theirs.append(os.dup(spec if isinstance(spec, int) else spec.fileno()))
        request = {"module": module, "argv": argv, "netns": netns, "cwd": os.path.abspath(cwd or os.getcwd()),
                   "env": {k: str(v) for k, v in (os.environ if env is None else env).items()},
                   "umask": os.umask(os.umask(0o022)), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}
        try:
            self.pid, self._ended = zygote.fork(request, theirs)
        except BaseException:
            for _, fd, _ in ours:
                os.close(fd)
            raise
        finally:
            for fd in set(theirs):
                os.close(fd)
        for name, fd, mode in ours:
            f = open(fd, mode, buffering=0 if name == "stdin" and not text else -1)
            if text:
                f = io.TextIOWrapper(f, write_through=name == "stdin", line_buffering=name == "stdin")
            setattr(self, name, f)

    def _internal_poll(self, _deadstate=None, _waitpid=None, _WNOHANG=None, _ECHILD=None):
        if self.returncode is None:
            self.returncode = self.zygote.wait(self._ended)
        return self.returncode

    def _wait(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.2 if deadline is None else deadline - time.monotonic()
            self.returncode = self.zygote.wait(self._ended, min(max(left, 0.0), 0.2))  # (others share the lock)
            if self.returncode is not None:
                return self.returncode
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)

    def __del__(self) -> None:  # Popen's warns of a child still running; the zygote reaps it
        pass


_zygote: Zygote | None = None
_netns: str | None = None  # in a forked child: the network namespace it runs in, and so do the processes it starts


def popen(args, *, stdin=None, stdout=None, stderr=None, text: bool = False, env=None, cwd=None,
          **kwargs) -> subprocess.Popen:
    """``subprocess.Popen``: forked by this worker's zygote when ``args`` is a plain ``python -m acqd.MODULE``."""
    netns, command = (args[3], list(args[4:])) if list(args[:3]) == NETNS_EXEC else (_netns, list(args))
    plain = command[:2] == PYTHON_M and len(command) > 2 and command[2].startswith("acqd.") and not kwargs \
        and _interpreter_env(env) == _interpreter_env(None)
    if not plain or _zygote is None:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd,
                                **kwargs)
    return Child(_zygote, list(args), command[2], command[3:], netns, stdin=stdin, stdout=stdout, stderr=stderr,
                 text=text, env=env, cwd=cwd)


def _interpreter_env(env: dict | None) -> dict:
    """The environment variables that change how Python starts (PYTHONPROFILEIMPORTTIME, PYTHONPATH, ...): a
    child forked from the zygote started as the zygote did."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k.startswith("PYTHON")}


def run(args, *, input=None, capture_output: bool = False, timeout: float | None = None, check: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` through ``popen``."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def start() -> None:
    global _zygote
    if _zygote is None:
        _zygote = Zygote.start()


def stop() -> None:
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None


# -- the zygote process ------------------------------------------------------------------------------
def serve(worker: socket.socket) -> tuple[dict, socket.socket] | None:
    """Fork a child per request, from the worker or from a child; in the child, return its request and its own
    connection (to run it); in the zygote, None once the worker is gone."""
    wake_r, wake_w = woken_by_children()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's
    clients = [worker]  # the worker, and each child still running (for what it starts)
    asked: dict[int, socket.socket] = {}  # pid -> whom to tell how it ended
    while True:
        ready = select.select([*clients, wake_r], [], [])[0]
        if wake_r in ready:
            os.read(wake_r, 4096)
            for pid, code in reaped():
                client = asked.pop(pid, None)
                if client in clients:
                    try:
                        client.send(f"exit {pid} {code}".encode())
                    except OSError:
                        pass  # it is going: it asked for nothing more
        for client in ready:
            if client is wake_r:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(client, 1 << 20, 3)
            except OSError:
                data, fds = b"", []
            if not data:
                if client is worker:
                    return None
                clients.remove(client)
                client.close()
                continue
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                pid = os.fork()
            except OSError as e:
                pid, answer = -1, f"error {e}"
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for sock in (*clients, ours):
                    sock.close()
                for fd in (wake_r, wake_w):
                    os.close(fd)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                for fd in set(fds) - {0, 1, 2}:
                    os.close(fd)
                return json.loads(data), theirs
            for fd in fds:
                os.close(fd)
            theirs.close()
            if pid > 0:
                clients.append(ours)
                asked[pid], answer = client, f"pid {pid}"
            else:
                ours.close()
            try:
                client.send(answer.encode())
            except OSError:
                pass  # it went meanwhile; its child is reaped all the same


def become(request: dict, sock: socket.socket) -> int:
    """In a forked child: be ``python -m MODULE ARGV`` started in ``cwd`` with ``env``; the processes it starts
    through ``acqd.service.procs.popen`` (a daemon's finalize and export runs) are forked by the zygote too."""
    global _zygote, _netns
    if request["netns"]:  # as ``ip netns exec`` does, its network part (acqd reads nothing it mounts anew)
        _netns = request["netns"]
        fd = os.open(f"/run/netns/{_netns}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"cannot enter network namespace {_netns}")
        finally:
            os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    os.chdir(request["cwd"])
    from acqd.service import procs

    _zygote, procs.popen = Zygote(sock), popen
    module, argv = request["module"], request["argv"]
    name = argv[0] if module == "acqd.cli" and argv else module.rsplit(".", 1)[1]
    ctypes.CDLL(None).prctl(PR_SET_NAME, f"acqd {name}".encode()[:15])
    sys.argv = [module, *argv]  # (runpy puts the module's file first)
    sys.orig_argv = [*PYTHON_M, module, *argv]
    sys.path[0] = request["cwd"]
    os.umask(request["umask"])
    resource.setrlimit(resource.RLIMIT_NOFILE, tuple(request["nofile"]))
    buffered = not sys.__stdout__.write_through  # -u, PYTHONUNBUFFERED: the zygote's are the worker's (``popen``)
    for fd, name in enumerate(("stdin", "stdout", "stderr")):  # as the interpreter makes them (create_stdio)
        was = getattr(sys, f"__{name}__")
        raw_only = not buffered and fd > 0
        binary = open(fd, "rb" if fd == 0 else "wb", buffering=0 if raw_only else -1, closefd=False)
        stream = io.TextIOWrapper(binary, encoding=was.encoding, errors=was.errors, newline="\n",
                                  line_buffering=buffered and (fd == 2 or os.isatty(fd)), write_through=not buffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.modules.pop(module, None)  # imported by the zygote: run afresh as __main__, as ``-m`` does (runpy warns else)
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # its ``sys.exit(main())`` ends the process
    return 0


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    from acqd.startup import importing

    with importing():  # what daemons, simulators and CLI runs import, once
        import nwbinspector  # noqa: F401
        import acqd.cli  # noqa: F401
        import acqd.finalize.nwb  # noqa: F401
        import acqd.record.group  # noqa: F401
        import acqd.service.daemon  # noqa: F401
        import acqd.share.export  # noqa: F401
        import acqd.sim.simulate  # noqa: F401
        import anyio._backends._asyncio  # noqa: F401 - imported at a daemon's first request
        import matplotlib.backends.backend_agg  # noqa: F401 - finalize's QC plots
        import probeinterface  # noqa: F401 - probe layouts
        import pydantic.v1  # noqa: F401 - FastAPI's check of each model, at the first request
    asked = serve(sock)
    if asked is not None:
        sys.exit(become(*asked))  # the interpreter's own exit: threads joined, atexit, streams flushed


if __name__ == "__main__":
    main()
