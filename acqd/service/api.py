"""The HTTP JSON control API and its client.

Routes (docs/control-api.md):
    POST /api/commands/<name>   any command of acqd.service.commands, JSON body = its request model
    GET  /api/status            Open Ephys compatible: {"mode": "IDLE"|"ACQUIRE"|"RECORD", ...}
    PUT  /api/status            {"mode": ...}
    GET  /api/recording         Open Ephys compatible: {"parent_directory": ..., ...}
    PUT  /api/recording         {"parent_directory"?, "prepend_text"?, "base_text"?, "append_text"?}
    GET  /api/streams           per-stream health
    GET  /api/sessions          sessions under the data root
    GET  /api/lsl               LSL outlets visible now, each with a config snippet (docs/lsl.md)

Loopback by default; with a token configured every request needs ``Authorization: Bearer <token>``
(the config refuses a non-loopback address without one). Errors come back as ``{"error": "..."}``
with 400 (bad request), 401, 404 or 409 (refused in the current state).
"""

from __future__ import annotations

import hmac
import os
import json
import signal
import sys
import threading
import traceback
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import ValidationError

from acqd.service.commands import COMMANDS, run_command
from acqd.config import RigConfig
from acqd.errors import AcqdError, ConfigError
from acqd.service.supervisor import Supervisor

ROUTES: dict[tuple[str, str], tuple[str, bool]] = {
    # (method, path) -> (command, whether the request body is passed on)
    ("GET", "/api/status"): ("status", False),
    ("PUT", "/api/status"): ("set_mode", True),
    ("GET", "/api/recording"): ("recording", False),
    ("PUT", "/api/recording"): ("recording", True),
    ("GET", "/api/streams"): ("status", False),
    ("GET", "/api/sessions"): ("sessions", False),
}


def make_handler(sup: Supervisor, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "acqd"

        def log_message(self, fmt: str, *args: object) -> None:  # quiet: the supervisor logs incidents
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            if token is not None:
                given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"})
            path = self.path.split("?", 1)[0].rstrip("/")
            if (method, path) == ("GET", "/api/lsl"):  # a 1 s network look: off the supervisor's thread
                from acqd.wire.lsldiscover import discovery

                return self._reply(HTTPStatus.OK, discovery())
            if method == "POST" and path.startswith("/api/commands/"):
                name, with_body = path.removeprefix("/api/commands/"), True
            elif (method, path) in ROUTES:
                name, with_body = ROUTES[(method, path)]
            else:
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}",
                                                          "commands": sorted(COMMANDS)})
            if name not in COMMANDS:
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no command {name!r}",
                                                          "commands": sorted(COMMANDS)})
            try:
                body = self._body() if with_body else {}
                result = run_command(sup, name, body)
            except (ValidationError, ValueError) as e:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except ConfigError as e:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except AcqdError as e:
                return self._reply(HTTPStatus.CONFLICT, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - a bug must still answer, and be logged
                traceback.print_exc()
                return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {e!r}"})
            if path == "/api/streams":
                result = {"streams": result["streams"]}
            self._reply(HTTPStatus.OK, result)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if n == 0:
                return {}
            body = json.loads(self.rfile.read(n))
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            return body

        def do_GET(self) -> None:
            self._handle("GET")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


def serve(cfg: RigConfig, ready_file: str | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT: supervisor on the main thread, HTTP on another."""
    sup = Supervisor(cfg)
    ctl = cfg.daemon.control
    httpd = ThreadingHTTPServer((ctl.host, ctl.port), make_handler(sup, ctl.token))
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    url = f"http://{host}:{port}"
    threading.Thread(target=httpd.serve_forever, name="acqd-http", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ready = {"url": url, "pid": os.getpid(), "data_root": str(sup.data_root)}
    if cfg.daemon.labrecorder is not None:  # LabRecorder's remote control socket (docs/lsl.md)
        from acqd.service.labrecorder import start_listener

        _, ready["labrecorder_port"] = start_listener(sup, cfg.daemon.labrecorder.host, cfg.daemon.labrecorder.port)
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            json.dump(ready, f)
        os.replace(ready_file + ".tmp", ready_file)
    print(f"acqd: serving {url} (data root {sup.data_root})", file=sys.stderr, flush=True)
    try:
        sup.serve(stop)
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("acqd: stopped", file=sys.stderr, flush=True)
    return 0


class Client:
    """A small client for the control API (used by the CLI, the demo and tests)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 150.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", str(e))
            except ValueError:
                message = str(e)
            raise ApiError(e.code, message) from None

    def command(self, name: str, **body: object) -> dict:
        return self.request("POST", f"/api/commands/{name}", body)


class ApiError(AcqdError):
    """The daemon refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
