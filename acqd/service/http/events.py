"""``GET /api/events``: the live event stream, as Server-Sent Events (docs/control-api.md "Events").

Each client gets the current ``status`` snapshot at once, then: every ``mode``, ``incident``, ``job`` and
``annotation`` event as it happens, and ``status`` snapshots at most ``STATUS_MAX_HZ`` times a second (only
when they changed). A client that reconnects with ``Last-Event-ID`` first gets the events it missed (of the
last few hundred); an id that is not a plain decimal number is treated as no id. A comment line every
``KEEPALIVE_S`` keeps proxies from closing an idle stream. A client too slow to read loses its own oldest
events, never anyone else's, and is told with a ``dropped`` event; one that reads nothing for the control
API's ``stall_timeout_s`` is disconnected by the server (acqd.service.http.serverlimits) and the others get an
``incident`` of kind ``event_stream_dropped``.

At most ``MAX_LISTENERS`` streams are served at once: a slot is taken when the request is answered, before
any await, and given back when the response ends however it ends, so a burst cannot overshoot the limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from acqd.service.supervisor import Supervisor

log = logging.getLogger("acqd")
STATUS_MAX_HZ = 2.0
KEEPALIVE_S = 15.0
MAX_LISTENERS = 16
"""Event streams served at once; each holds one of the server's connections for as long as it is open."""
STALLED_S = 1.0
"""A send blocked this long means the client stopped reading: a reading client takes milliseconds."""
_EVENT_ID = re.compile(r"[0-9]{1,19}")


def last_event_id(value: str | None) -> int | None:
    """A ``Last-Event-ID`` header as an event id; anything but 1-19 ASCII digits is "no id" (never an error)."""
    return int(value) if value is not None and _EVENT_ID.fullmatch(value) else None


class _Slots:
    """The event streams open now; taken and given back on the event loop's thread only (no await between
    the check and the take, so no lock is needed)."""

    def __init__(self, limit: int):
        self.limit, self.taken = limit, 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


class _SlotResponse(StreamingResponse):
    """A streaming response that gives its slot back when it ends, even if its body never started, and calls
    ``on_stall(seconds)`` when it ended with (or after) a send blocked for ``STALLED_S`` or more."""

    def __init__(self, slots: _Slots, on_stall: Callable[[float], None], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots, self.on_stall = slots, on_stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        blocked_since: float | None = None
        stalled = 0.0

        async def timed(message: Message) -> None:
            nonlocal blocked_since, stalled
            blocked_since = time.monotonic()
            await send(message)  # cancelled here (the client went away): blocked_since stays set
            stalled, blocked_since = max(stalled, time.monotonic() - blocked_since), None

        try:
            await super().__call__(scope, receive, timed)
        finally:
            self.slots.give()
            if blocked_since is not None:
                stalled = max(stalled, time.monotonic() - blocked_since)
            if stalled >= STALLED_S:
                self.on_stall(stalled)


def events_router(sup: Supervisor, closing: threading.Event) -> APIRouter:
    router = APIRouter(tags=["events"])
    slots = _Slots(MAX_LISTENERS)

    @router.get("/api/events", summary="live events (text/event-stream): status, mode, incident, job, annotation",
                response_class=StreamingResponse, response_model=None)
    async def events(request: Request) -> StreamingResponse | JSONResponse:
        if not slots.take():
            return JSONResponse({"error": f"at most {MAX_LISTENERS} event streams at once"}, status_code=503)
        after = last_event_id(request.headers.get("last-event-id"))
        return _SlotResponse(slots, lambda s: _dropped(sup, request, s), _stream(sup, request, closing, after),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def _stream(sup: Supervisor, request: Request, closing: threading.Event,
                  after: int | None) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    listener = sup.events.subscribe(lambda: loop.call_soon_threadsafe(wake.set), after)
    period = 1.0 / STATUS_MAX_HZ
    sent_seq, sent_at, said_at, dropped = -1, 0.0, time.monotonic(), 0
    try:
        yield b"retry: 2000\n\n"
        while not closing.is_set():
            wake.clear()  # before draining: an event published while we drain wakes the next wait at once
            while listener.queue:
                yield listener.queue.popleft().sse()
            if listener.dropped != dropped:
                dropped = listener.dropped
                yield f"event: dropped\ndata: {{\"dropped\": {dropped}}}\n\n".encode()
            now, snap = time.monotonic(), sup.snapshot
            if snap.seq != sent_seq and now - sent_at >= period:
                yield b"event: status\ndata: " + snap.body + b"\n\n"
                sent_seq, sent_at, said_at = snap.seq, now, now
            elif now - said_at >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                said_at = now
            if await request.is_disconnected():
                break
            try:
                await asyncio.wait_for(wake.wait(), timeout=max(0.05, period - (time.monotonic() - sent_at)))
            except TimeoutError:
                pass
    finally:
        sup.events.unsubscribe(listener)


def _dropped(sup: Supervisor, request: Request, stalled_s: float) -> None:
    """Tell the other clients (and the log) that a client that stopped reading was dropped."""
    detail = f"event stream of {_client(request)} read nothing for {stalled_s:.1f} s: disconnected"
    log.warning("events: %s", detail)
    sup.events.publish("incident", {"stream": None, "kind": "event_stream_dropped", "detail": detail,
                                    "incomplete": False, "session": None})
