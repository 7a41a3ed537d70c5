"""``GET /api/events``: the live event stream, as Server-Sent Events (docs/control-api.md "Events").

Each client gets the current ``status`` snapshot at once, then: every ``mode``, ``incident``, ``job`` and
``annotation`` event as it happens, and ``status`` snapshots at most ``STATUS_MAX_HZ`` times a second (only
when they changed). A client that reconnects with ``Last-Event-ID`` first gets the events it missed (of the
last few hundred). A comment line every ``KEEPALIVE_S`` keeps proxies from closing an idle stream. A client
too slow to read loses its own oldest events, never anyone else's, and is told with a ``dropped`` event.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from acqd.service.supervisor import Supervisor

STATUS_MAX_HZ = 2.0
KEEPALIVE_S = 15.0
MAX_LISTENERS = 16
"""Event streams served at once; each holds one of the server's connections for as long as it is open."""


def events_router(sup: Supervisor, closing: threading.Event) -> APIRouter:
    router = APIRouter(tags=["events"])
    listeners = [0]

    @router.get("/api/events", summary="live events (text/event-stream): status, mode, incident, job, annotation",
                response_class=StreamingResponse, response_model=None)
    async def events(request: Request) -> StreamingResponse | JSONResponse:
        if listeners[0] >= MAX_LISTENERS:
            return JSONResponse({"error": f"at most {MAX_LISTENERS} event streams at once"}, status_code=503)
        last = request.headers.get("last-event-id")
        after = int(last) if last and last.isdigit() else None
        return StreamingResponse(_stream(sup, request, closing, after, listeners), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


async def _stream(sup: Supervisor, request: Request, closing: threading.Event, after: int | None,
                  listeners: list[int]) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    listener = sup.events.subscribe(lambda: loop.call_soon_threadsafe(wake.set), after)
    listeners[0] += 1
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
        listeners[0] -= 1
        sup.events.unsubscribe(listener)
