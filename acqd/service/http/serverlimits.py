"""Connection limits of the control API's HTTP server, at the one layer that sees a socket that never sends.

uvicorn counts open connections against ``limit_concurrency`` and answers 503 beyond it, and it has no timeout
before a connection's first request: 520 sockets that connect and send nothing locked everyone out for as long
as they stayed (issue 22.7). An ASGI middleware never sees such a socket (no request ever reaches the app), so
the limits live in uvicorn's own HTTP protocol, subclassed here:

- **request timeout**: a connection must complete a request (headers and body) within ``request_timeout_s`` of
  opening or of its last response, however slowly it trickles bytes; otherwise it is closed.
- **stall timeout**: a connection that reads nothing of what it is sent (its writes stay paused) for
  ``stall_timeout_s`` is aborted; this frees event streams whose client stopped reading.
- **per-client and total caps**: beyond ``max_connections_per_client`` from one address, or ``MAX_CONNECTIONS``
  in all (kept below uvicorn's ``limit_concurrency``), the connection idle longest (no request in flight) is
  closed to make room; when none is idle the new connection is refused. So idle sockets of any client,
  loopback ones included, give way to a client that has a request to make (a newcomer is never the longest
  idle: it just arrived).

Every close is counted per reason and logged (one line per reason at most every ``LOG_EVERY_S``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from acqd.config import ControlConfig

log = logging.getLogger("acqd")
LOG_EVERY_S = 10.0
MAX_CONNECTIONS = 448
"""Connections at once in all: below the API's ``LIMIT_CONCURRENCY`` (512), so uvicorn never answers 503 for
want of a connection while idle ones could make room."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's connection limits (from ``daemon.control``)."""

    request_timeout_s: float
    """Seconds a connection has to complete a request's headers after opening or after its last response."""
    stall_timeout_s: float
    """Seconds a connection may leave everything sent to it unread before it is aborted."""
    per_client: int
    """Connections from one client address at once."""
    total: int
    """Connections at once in all (below uvicorn's ``limit_concurrency``, so that it never answers 503)."""


class Registry:
    """The open connections, per client address, oldest first; and what was closed, per reason."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.by_client: dict[str, dict[LimitedProtocol, None]] = {}
        self.count = 0
        self.closed: Counter[str] = Counter()
        self._logged: dict[str, float] = {}

    def admit(self, conn: LimitedProtocol) -> None:
        """Register a new connection; make room by closing the longest-idle one, or refuse it."""
        mine = self.by_client.setdefault(conn.client_key, {})
        mine[conn] = None
        self.count += 1
        for over, pool in ((len(mine) > self.limits.per_client, mine), (self.count > self.limits.total, None)):
            if not over:
                continue
            victim = self._longest_idle(conn, pool)
            if victim is None:
                self.close(conn, "refused (every connection busy)")
                return
            self.close(victim, "evicted idle")

    def _longest_idle(self, newcomer: LimitedProtocol, pool: dict | None) -> LimitedProtocol | None:
        candidates = pool if pool is not None else (c for conns in self.by_client.values() for c in conns)
        idle = [c for c in candidates if c is not newcomer and not c.busy() and not c.transport.is_closing()]
        return min(idle, key=lambda c: c.idle_since, default=None)

    def forget(self, conn: LimitedProtocol) -> None:
        mine = self.by_client.get(conn.client_key, {})
        if conn in mine:  # once: close() forgets it at once, connection_lost() later
            del mine[conn]
            self.count -= 1
            if not mine:
                del self.by_client[conn.client_key]

    def close(self, conn: LimitedProtocol, reason: str, abort: bool = False) -> None:
        self.forget(conn)
        self.closed[reason] += 1
        self._log(conn.loop.time(), reason, conn.client_key)
        if abort:
            conn.transport.abort()  # close() would wait for the unread bytes to drain: forever
        else:
            conn.transport.close()

    def _log(self, now: float, reason: str, client: str) -> None:
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            log.warning("control API: connection from %s %s (%d so far for this reason; %d open)", client, reason,
                        self.closed[reason], self.count)
            self._logged[reason] = now


class LimitedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the limits of the module docstring; ``registry`` is set per server."""

    registry: Registry

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_key = self.client[0] if self.client else "local"
        self.idle_since = self.loop.time()
        self._stall: asyncio.TimerHandle | None = None
        self._deadline = self.loop.call_later(self.registry.limits.request_timeout_s, self._check_request)
        self.registry.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.forget(self)
        for timer in (self._deadline, self._stall):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def busy(self) -> bool:
        """A request is in flight (its headers arrived and its response is not complete)."""
        return self.cycle is not None and not self.cycle.response_complete

    def on_response_complete(self) -> None:
        self.idle_since = self.loop.time()
        super().on_response_complete()

    def _check_request(self) -> None:
        if self.transport.is_closing():
            return
        timeout = self.registry.limits.request_timeout_s
        # IDLE: its request's headers are not (all) here; SEND_BODY: its body is not. Otherwise we are the slow end.
        waiting = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        left = self.idle_since + timeout - self.loop.time() if waiting else timeout
        if left <= 0:
            self.registry.close(self, f"closed: no whole request within {timeout:g} s")
            return
        self._deadline = self.loop.call_later(left, self._check_request)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.registry.limits.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        self.registry.close(self, f"aborted: read nothing for {self.registry.limits.stall_timeout_s:g} s",
                            abort=True)


def server_protocol(ctl: ControlConfig) -> type[LimitedProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with its own registry (one per server)."""
    limits = Limits(ctl.request_timeout_s, ctl.stall_timeout_s, ctl.max_connections_per_client, MAX_CONNECTIONS)
    return type("LimitedProtocol", (LimitedProtocol,), {"registry": Registry(limits)})
