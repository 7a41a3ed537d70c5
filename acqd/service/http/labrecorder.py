"""LabRecorder's remote control socket, served by acqd: experiment software that drives LabRecorder drives acqd.

This module owns the optional TCP listener (``daemon.labrecorder``; LabRecorder's port 22345, loopback by default)
and the mapping of LabRecorder's text commands onto acqd (docs/lsl.md "LabRecorder compatibility"): one command a
line; ``start`` records a session named from the last ``filename`` command, ``stop`` closes it, ``select all``,
``select none`` and ``update`` are accepted (acqd records every configured stream; its bridges look for outlets
all the time). LabRecorder answers ``OK`` (no line end) to every line; acqd does the same for what it carried out,
and answers ``error: <reason>`` and a line end for what it refused or did not understand. No input ends the
listener: a bad line gets an error, a closed connection is forgotten.
"""

from __future__ import annotations

import re
import socketserver
import threading
from pathlib import Path

from acqd.finalize.amend import check_metadata
from acqd.metadata import merge, to_acqd
from acqd.config import check_name
from acqd.service.supervisor import RECORD, Supervisor

OK = b"OK"
_OPTION = re.compile(r"\{(?P<option>[A-Za-z]+):(?P<value>[^{}\r\n]*)\}")
FILENAME_OPTIONS = ("root", "template", "task", "run", "participant", "session", "acquisition", "modality")
_TEMPLATE = {"%p": "participant", "%s": "session", "%b": "task", "%n": "run", "%a": "acquisition", "%m": "modality"}


def parse_filename(line: str) -> dict[str, str]:
    """``filename {root:..} {task:..} ...`` -> {option: value}; unknown options are refused."""
    opts = {m["option"].lower(): m["value"].strip() for m in _OPTION.finditer(line)}
    unknown = sorted(set(opts) - set(FILENAME_OPTIONS))
    if unknown:
        raise ValueError(f"unknown filename option(s) {', '.join(unknown)}; known: {', '.join(FILENAME_OPTIONS)}")
    return opts


def session_name(opts: dict[str, str]) -> str | None:
    """The session folder name for LabRecorder's naming options, BIDS style as LabRecorder's default
    (``sub-<participant>_ses-<session>_task-<task>_acq-<acquisition>_run-<run>``), or its legacy ``template``
    with its %p %s %b %n %a %m placeholders (path separators become ``_``, ``.xdf`` is dropped)."""
    if opts.get("template"):
        name = opts["template"]
        for key, option in _TEMPLATE.items():
            name = name.replace(key, opts.get(option, ""))
        name = re.sub(r"[\\/]+", "_", name.removesuffix(".xdf")).strip("_")
    else:
        parts = [f"{tag}-{opts[key]}" for tag, key in (("sub", "participant"), ("ses", "session"), ("task", "task"),
                                                        ("acq", "acquisition"), ("run", "run")) if opts.get(key)]
        if not parts:
            return None
        name = "_".join(parts)
    return check_name(name, "session name")


class LabRecorderControl:
    """The state behind the socket: the naming options so far; commands run on the supervisor's thread."""

    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.options: dict[str, str] = {}

    def handle(self, line: str) -> bytes:
        """One command line -> the reply bytes."""
        cmd = line.strip()
        try:
            if cmd in ("select all", "select none", "update"):
                return OK
            if cmd.startswith("filename"):
                opts = {**self.options, **parse_filename(cmd)}
                session_name(opts)  # refuse a name acqd cannot use now, not at start
                self.options = opts
                return OK
            if cmd == "start":
                self.sup.call(self._start)
                return OK
            if cmd == "stop":
                self.sup.call(lambda: self.sup.stop_recording() if self.sup.mode == RECORD else None)
                return OK
            raise ValueError(f"unknown command {cmd!r}; known: select all, select none, start, stop, update, "
                             "filename {option:value} ...")
        except Exception as e:  # noqa: BLE001 - a client's bad line or a refused start is a reply, never a crash
            return f"error: {e}\n".replace("\n", " ").rstrip().encode() + b"\n"

    def _start(self) -> dict:
        if self.sup.mode == RECORD:
            return self.sup.status()  # LabRecorder: start while recording changes nothing
        root = Path(self.options["root"]).resolve() if self.options.get("root") else None
        if root is not None and root != self.sup.data_root:
            self.sup.set_data_root(root)
        participant = self.options.get("participant")
        meta = {"subject": {"subject_id": participant}} if participant else None
        name = session_name(self.options)
        check_metadata(merge(to_acqd(self.sup.cfg.metadata), meta or {}), name)  # finalize's rules, as RECORD's
        return self.sup.record(meta, name)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        control: LabRecorderControl = self.server.control  # type: ignore[attr-defined]
        for raw in self.rfile:
            if raw.strip():
                self.wfile.write(control.handle(raw.decode("utf-8", errors="replace")))
                self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_listener(sup: Supervisor, host: str, port: int) -> tuple[_Server, int]:
    """Serve LabRecorder's remote control on ``host:port`` (0: any free port) in a thread; returns the server
    (``shutdown()`` it) and the port it listens on."""
    server = _Server((host, port), _Handler)
    server.control = LabRecorderControl(sup)  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="acqd-labrecorder", daemon=True).start()
    return server, server.server_address[1]
