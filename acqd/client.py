"""The Python client of the control API (httpx), used by the CLI, the demo, scripts and tests.

``Client.command(name, **body)`` posts to ``/api/commands/<name>`` (docs/control-api.md); an unreachable daemon
raises ``DaemonUnreachable``, a refusal ``ApiError`` with the HTTP status. Imports: ``acqd.errors`` only, so a
script that drives a daemon never loads the daemon's code.
"""

from __future__ import annotations

import getpass
import os
import ssl
import threading

import httpx

from acqd.errors import AcqdError


class DaemonUnreachable(AcqdError):
    """No daemon answers at the URL (not running, wrong address or port)."""


class ApiError(AcqdError):
    """The daemon refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _login() -> str:
    """The operator's login name, which the daemon logs with each command (no identity is proven by it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return f"uid {os.getuid()}"


_thread = threading.local()


def _tls() -> ssl.SSLContext:
    """httpx's default TLS context (its CA bundle, ``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured), made once per
    thread: making one reads the CA bundle, 20 ms of CPU, and a rig's leader makes a client per request to each
    follower, every second. Not shared between threads: httpcore sets its ALPN protocols at each connection."""
    context = getattr(_thread, "tls", None)
    if context is None:
        context = _thread.tls = httpx.create_ssl_context()
    return context


class Client:
    """A small client for the control API (used by the CLI, the demo and tests)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | httpx.Timeout = 150.0,
                 operator: str | None = None):
        """``operator``: who the daemon logs as sending the commands (default: this login name)."""
        self.url = url.rstrip("/")
        headers = {"X-Acqd-Operator": operator or _login(), **({"Authorization": f"Bearer {token}"} if token else {})}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=_tls())

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise DaemonUnreachable(f"no acqd daemon at {self.url} ({e}): is it running? (acqd serve)") from None
        except httpx.TransportError as e:
            raise DaemonUnreachable(f"lost the connection to {self.url}: {e!r}") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text}
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, data.get("error", str(data)) if isinstance(data, dict) else str(data))
        return data

    def command(self, name: str, **body: object) -> dict:
        return self.request("POST", f"/api/commands/{name}", body)

    def close(self) -> None:
        self._http.close()
