"""LabRecorder's remote control socket, served by acqd: experiment software that drives LabRecorder drives acqd.

This module owns the optional TCP listener (``daemon.labrecorder``: off unless configured; LabRecorder's port
22345, loopback by default) and the mapping of LabRecorder's text commands onto acqd (docs/lsl.md "LabRecorder
compatibility"), read from LabRecorder's own source (src/tcpinterface.cpp, src/mainwindow.cpp
``rcsUpdateFilename`` and ``startRecording``):

- one command a line, matched in any case; ``start`` records a session named from the ``filename`` options so
  far, ``stop`` closes it; ``select all``, ``select none`` and ``update`` are accepted (acqd records every
  configured stream; its bridges look for outlets all the time).
- ``filename {option:value} ...``: the options LabRecorder knows are remembered, any other ``{x:...}`` is
  ignored as LabRecorder ignores it; ``root`` must lie in ``daemon.data_root`` or ``control.data_roots``
  (a refused root is an ``error:`` reply and an incident, and the data root does not move).
- a start records unless recording is impossible (acqd.service.http.compat): a taken name gets the next free
  ``<name>_<n>``, a participant with spaces or accents names the folder in plain letters and is the subject id
  as typed. LabRecorder answers ``OK`` (no line end) to every line; acqd answers ``OK`` when it did what was
  asked (``OK <note>`` and a line end when it named the session differently), and ``error: <reason>`` and a
  line end for what it refused. Every refusal is also an incident (log, console, ``acqd status``).

The listener is bounded: one thread for every connection (asyncio) plus one that runs commands in order,
lines of at most ``MAX_LINE_BYTES``, at most ``max_connections`` clients, a first line within
``FIRST_LINE_TIMEOUT_S``. What is not LabRecorder's protocol ends the connection: an HTTP request line (a web
page POSTing text/plain to this port), bytes that are not text, a line too long, a wrong or missing token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from acqd.config import LabRecorderConfig, check_name
from acqd.errors import AcqdError, SessionError
from acqd.service.commands import COMMANDS, RecordRequest, confined, data_roots
from acqd.service.http.compat import Incidents, bids_label, folder_name, start_metadata, unique_session
from acqd.service.supervisor import RECORD, Supervisor
from acqd.session import session_name as timestamp_name

log = logging.getLogger("acqd")
OK = b"OK"
MAX_LINE_BYTES = 16 * 1024
"""LabRecorder's longest line is a ``filename`` line of a few paths; a longer line ends the connection."""
FIRST_LINE_TIMEOUT_S = 10.0
"""A client that sends no line this long after connecting is closed (it holds a connection slot)."""
REPLY_TIMEOUT_S = 10.0
"""A client that reads no replies while they pile up is closed after this long."""
# LabRecorder's own pattern: {option:value}, option a word, value up to the closing brace.
_OPTION = re.compile(r"\{(?P<option>\w+?):(?P<value>[^}]*)\}")
_HTTP_REQUEST = re.compile(r"^[A-Z]+ \S+ HTTP/\d", re.ASCII)
FILENAME_OPTIONS = ("root", "template", "task", "run", "participant", "session", "acquisition", "modality")
_TEMPLATE = {"%p": "participant", "%s": "session", "%b": "task", "%n": "run", "%r": "run", "%a": "acquisition",
             "%m": "modality"}


class ProtocolViolation(Exception):
    """Not LabRecorder's line protocol: the connection is closed."""


def parse_filename(line: str) -> dict[str, str]:
    """``filename {root:..} {task:..} ...`` -> {option: value} for the options LabRecorder knows; anything else
    in braces (``{C:\\Data}``) is ignored, as LabRecorder ignores it."""
    opts = {m["option"].lower(): m["value"].strip() for m in _OPTION.finditer(line)}
    return {k: v for k, v in opts.items() if k in FILENAME_OPTIONS}


def ignored_options(line: str) -> list[str]:
    """The ``{option:...}`` names of a ``filename`` line that LabRecorder ignores (reported, never refused)."""
    return sorted({m["option"] for m in _OPTION.finditer(line) if m["option"].lower() not in FILENAME_OPTIONS})


def session_name(opts: dict[str, str]) -> str | None:
    """The session folder name for LabRecorder's naming options, BIDS style as LabRecorder's default
    (``sub-<participant>_ses-<session>_task-<task>_acq-<acquisition>_run-<run>``, labels in letters and digits),
    or its legacy ``template`` (lower-cased, as LabRecorder does) with its %p %s %b %n/%r %a %m placeholders
    (path separators become ``_``, ``.xdf`` is dropped); any text becomes a usable folder name
    (acqd.service.http.compat.folder_name). None: nothing to name it by."""
    if opts.get("template"):
        name = opts["template"].lower()
        for key, option in _TEMPLATE.items():
            name = name.replace(key, opts.get(option, ""))
        name = re.sub(r"[\\/]+", "_", name.removesuffix(".xdf"))
    else:
        parts = [f"{tag}-{bids_label(opts[key])}" for tag, key in (("sub", "participant"), ("ses", "session"),
                                                                    ("task", "task"), ("acq", "acquisition"),
                                                                    ("run", "run")) if bids_label(opts.get(key, ""))]
        name = "_".join(parts)
    name = folder_name(name)
    return check_name(name, "session name") if name else None


class LabRecorderControl:
    """The state behind the socket: the naming options so far; commands run on the supervisor's thread."""

    def __init__(self, sup: Supervisor, incidents: Incidents | None = None):
        self.sup = sup
        self.options: dict[str, str] = {}
        self.incidents = incidents or Incidents(sup, "LabRecorder")

    def handle(self, line: str) -> bytes:
        """One command line -> the reply bytes."""
        cmd = line.strip()
        word = cmd.lower()
        try:
            if word in ("select all", "select none", "update"):
                return OK
            if word.startswith("filename"):
                return self._filename(cmd)
            if word == "start":
                return self.sup.call(self._start)
            if word == "stop":
                self.sup.call(lambda: self.sup.stop_recording() if self.sup.mode == RECORD else None)
                return OK
            raise ValueError(f"unknown command {cmd[:80]!r}; known: select all, select none, start, stop, update, "
                             "filename {option:value} ...")
        except Exception as e:  # noqa: BLE001 - a refused start or a bad line is a reply, never a crash
            if not isinstance(e, (AcqdError, ValueError, TimeoutError)):
                log.exception("LabRecorder command %r failed", cmd[:80])
            kind = "labrecorder_start_refused" if word == "start" else "labrecorder_refused"
            reason = " ".join(str(e).split()) or type(e).__name__
            self.incidents.report(kind, f"{cmd[:80]!r} refused: {reason}", like=reason[:40])
            return f"error: {reason}".encode() + b"\n"

    def _filename(self, cmd: str) -> bytes:
        opts = parse_filename(cmd)
        root = opts.pop("root", None)
        self.options.update(opts)
        if root:
            try:  # checked now (nothing is created); the data root moves only when a start succeeds
                self.options["root"] = str(confined(root, data_roots(self.sup), "root"))
            except (AcqdError, ValueError) as e:
                raise ValueError(f"{e}; the other options were taken") from None
        return OK

    def _start(self) -> bytes:
        """On the supervisor thread: RECORD a session named from the options, under their root."""
        if self.sup.mode == RECORD:
            return OK  # LabRecorder: start while recording changes nothing
        previous = self.sup.data_root
        root = previous
        if self.options.get("root"):  # checked again: a folder may have been swapped for a link since
            root = confined(self.options["root"], data_roots(self.sup), "root")
        created = _absent(root)
        if root != previous:
            self.sup.set_data_root(root)
        try:
            wanted = session_name(self.options) or timestamp_name()
            name = unique_session(self.sup.data_root, wanted)
            meta = start_metadata(self.sup.next_metadata, self.options.get("participant"))
            COMMANDS["record"].handler(self.sup, RecordRequest(session=name, metadata=meta or None))
        except BaseException:
            if self.sup.data_root != previous and self.sup.mode != RECORD:
                self.sup.set_data_root(previous)  # a refused start leaves the data root where it was,
                _remove_empty(created)  # and no folder it made
            raise
        if name == wanted:
            return OK
        note = f"session {wanted!r} exists in {self.sup.data_root}: recording as {name!r}"
        self.incidents.report("session_renamed", note, summarise=False)
        return f"OK {note}".encode() + b"\n"


def _absent(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) that hold nothing but the data-root lock file acqd left there."""
    for folder in reversed(folders):
        try:
            (folder / ".acqd.lock").unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            return  # not empty: something else was put there


class LabRecorderServer:
    """The listener: an asyncio loop on its own thread for every connection, commands run one at a time."""

    def __init__(self, sup: Supervisor, cfg: LabRecorderConfig):
        self.cfg = cfg
        self.incidents = Incidents(sup, "LabRecorder")
        self.control = LabRecorderControl(sup, self.incidents)
        self.port = 0
        self.connections = 0
        self._commands = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acqd-labrecorder-cmd")
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> int:
        """Listen (``OSError`` if the port is taken) and serve on a thread; returns the port."""
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._client, self.cfg.host, self.cfg.port, limit=MAX_LINE_BYTES, reuse_address=True))
        self.port = self._server.sockets[0].getsockname()[1]
        threading.Thread(target=self._loop.run_forever, name="acqd-labrecorder", daemon=True).start()
        return self.port

    def shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._commands.shutdown(wait=False, cancel_futures=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.connections >= self.cfg.max_connections:
            self.incidents.report("labrecorder_refused", f"connection from {peer} refused: too many "
                                  f"connections, already {self.connections} clients (labrecorder.max_connections)", like="busy")
            await self._close(writer, b"error: too many connections\n")
            return
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except ProtocolViolation as e:
            self.incidents.report("labrecorder_refused", f"connection from {peer} closed: {e}", like=e.args[0][:20])
            await self._close(writer, f"error: {e}\n".encode())
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away (or never spoke, or never read its replies): forgotten
        finally:
            self.connections -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            line = await self._line(reader, FIRST_LINE_TIMEOUT_S if first else None)
            if line is None:
                return
            if not line.strip():
                continue
            if first and self.cfg.token:
                words = line.split()
                if len(words) != 2 or words[0].lower() != "token" or not hmac.compare_digest(
                        words[1].encode(), self.cfg.token.encode()):
                    raise ProtocolViolation("a token is required: send `token <secret>` as the first line")
                reply = OK
            else:
                reply = await self._loop.run_in_executor(self._commands, self.control.handle, line)
            first = False
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), REPLY_TIMEOUT_S)

    @staticmethod
    async def _line(reader: asyncio.StreamReader, timeout_s: float | None) -> str | None:
        """The next line as text (None at the end), or ProtocolViolation for what LabRecorder never sends."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout_s)
        except asyncio.IncompleteReadError as e:
            raw = e.partial  # the last line may lack its line end (LabRecorder reads it once more arrives)
            if not raw.strip():
                return None
        except asyncio.LimitOverrunError:
            raise ProtocolViolation(f"a line longer than {MAX_LINE_BYTES} bytes") from None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("bytes that are not UTF-8 text") from None
        if any(c < " " and c not in "\t\r\n" for c in line):
            raise ProtocolViolation("control characters in a line")
        if _HTTP_REQUEST.match(line):
            raise ProtocolViolation(f"an HTTP request ({line.split()[0]} ...), not LabRecorder's line protocol")
        return line

    @staticmethod
    async def _close(writer: asyncio.StreamWriter, reply: bytes) -> None:
        try:
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), 1.0)
        except (ConnectionError, TimeoutError):
            pass
        writer.close()


def start_listener(sup: Supervisor, cfg: LabRecorderConfig) -> LabRecorderServer:
    """Serve LabRecorder's remote control as ``cfg`` says, on its own thread; ``shutdown()`` it when done."""
    server = LabRecorderServer(sup, cfg)
    try:
        server.start()
    except OSError as e:
        raise SessionError(f"LabRecorder's port {cfg.host}:{cfg.port} cannot listen ({e.strerror or e}): change "
                           f"daemon.labrecorder.port, or stop what holds it") from None
    log.info("LabRecorder remote control on %s:%d%s", cfg.host, server.port, " (token required)" if cfg.token else "")
    return server
