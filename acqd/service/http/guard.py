"""The control API's front door: one ASGI middleware that every request passes before any route.

In order, each failure answered ``{"error": ...}`` and nothing else run:
  421  the ``Host`` header is not a loopback name/address or one of ``control.allowed_hosts`` (DNS rebinding)
  403  an ``Origin`` header that is neither this server nor one of ``control.cors_origins`` (cross-site requests)
  401  ``control.token`` is set and the request lacks ``Authorization: Bearer <token>`` (strict, constant time)
  413  a body over ``MAX_BODY_BYTES`` (``Content-Length`` or as it streams); 400 a malformed ``Content-Length``
  415  a body that is not ``application/json``; the one exception is a PUT without any Content-Type (the Open
       Ephys client sends none), which a browser cannot send cross-site without a CORS preflight
  400  JSON nested deeper than ``MAX_JSON_DEPTH`` (checked before any parser recurses)
Pure functions decide each rule so that they are unit-tested on their own.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Iterable

from acqd.service.commands import CALLER

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_BEARER = re.compile(r"Bearer ([A-Za-z0-9\-._~+/]+=*)")  # RFC 6750 b64token, nothing around it
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def caller(client: tuple[str, int] | None, headers: dict[str, str]) -> str:
    """Who sent a request, for the logs: the peer address, and the operator the client names (``X-Acqd-Operator``,
    sent by acqd's own client) or else its User-Agent (an Open Ephys script, a browser)."""
    who = (headers.get("x-acqd-operator") or headers.get("user-agent") or "unknown client")[:80]
    return f"{client[0] if client else 'unknown address'} ({who.encode('ascii', 'replace').decode()})"


def host_name(host_header: str) -> str:
    """The name or address of a ``Host`` header, without port or IPv6 brackets, lower case."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def host_allowed(host_header: str | None, allowed: Iterable[str]) -> bool:
    """Loopback names and addresses, and the configured names; no Host header (HTTP/1.0) is refused."""
    if not host_header:
        return False
    name = host_name(host_header)
    if name in LOOPBACK_NAMES or name in {a.lower() for a in allowed}:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, host_header: str | None, scheme: str, allowed: Iterable[str]) -> bool:
    """No Origin (not a browser, or same-origin GET), the server's own origin, or a configured one."""
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    return origin == f"{scheme}://{(host_header or '').lower()}" or origin in {a.rstrip("/").lower() for a in allowed}


def bearer_ok(authorization: str | None, token: str | None) -> bool:
    """Exactly ``Bearer <token>`` when a token is configured; compared in constant time."""
    if token is None:
        return True
    m = _BEARER.fullmatch(authorization or "")
    return m is not None and hmac.compare_digest(m.group(1).encode(), token.encode())


def media_type_ok(method: str, content_type: str | None, body: bytes) -> bool:
    if not body and content_type is None:
        return True
    if content_type is None:
        return method == "PUT"
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def json_depth(body: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in a JSON text, ignoring strings (linear, no recursion)."""
    depth = deepest = 0
    in_str = escaped = False
    for b in body:
        if in_str:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


Send = Callable[[dict], Awaitable[None]]


class Guard:
    """The ASGI middleware applying the rules above (settings from ``control``)."""

    def __init__(self, app, *, allowed_hosts: Iterable[str], cors_origins: Iterable[str], token: str | None,
                 open_paths: Iterable[str] = ()):
        self.app = app
        self.allowed_hosts, self.cors_origins = tuple(allowed_hosts), tuple(cors_origins)
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        host = headers.get("host")
        if not host_allowed(host, self.allowed_hosts):
            return await _error(send, 421, f"Host {host!r} is not served here: add it to control.allowed_hosts")
        if not origin_allowed(headers.get("origin"), host, scope.get("scheme", "http"), self.cors_origins):
            return await _error(send, 403, f"cross-origin request from {headers['origin']!r} refused: add the origin "
                                           f"to control.cors_origins")
        if method == "OPTIONS":  # a CORS preflight from an allowed origin: answered by the CORS layer
            return await self.app(scope, receive, send)
        if scope["path"] not in self.open_paths and not bearer_ok(headers.get("authorization"), self.token):
            return await _error(send, 401, "missing or wrong token (Authorization: Bearer <token>)",
                                [(b"www-authenticate", b"Bearer")])
        CALLER.set(caller(scope.get("client"), headers))  # this request's context: its route and threadpool
        if method not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await _error(send, 400, f"malformed Content-Length {length!r}")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return await _error(send, 413, f"body over {MAX_BODY_BYTES} bytes")
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            return await _error(send, 413, f"body over {MAX_BODY_BYTES} bytes")
        if not media_type_ok(method, headers.get("content-type"), body):
            return await _error(send, 415, "the body must be JSON (Content-Type: application/json)")
        if json_depth(body) > MAX_JSON_DEPTH:
            return await _error(send, 400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if body and "content-type" not in headers:  # the Open Ephys PUT: say what it is, for the routes
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """The body already read, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Send, status: int, message: str, extra: list | None = None) -> None:
    data = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": data})
