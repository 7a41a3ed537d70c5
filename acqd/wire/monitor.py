"""ZeroMQ socket monitor events, read without importing asyncio.

pyzmq's ``zmq.utils.monitor.recv_monitor_message`` is what this is; that module imports ``zmq.asyncio`` (asyncio and
ssl) at its top, ~15 ms of CPU in every writer's start-up and every simulated driver's, which never use asyncio.
The message format is libzmq's (``zmq_socket_monitor``, libzmq >= 4.0): a first frame of a 16-bit event id and a
32-bit value, native byte order, no padding, then the endpoint.
"""

from __future__ import annotations

import struct

import zmq

_EVENT = struct.Struct("=hi")


def recv_monitor_message(socket: zmq.Socket, flags: int = 0) -> dict:
    """The next event on a monitor socket (``Socket.get_monitor_socket()``): ``{event, value, endpoint}``."""
    msg = socket.recv_multipart(flags)
    if len(msg) != 2 or len(msg[0]) != _EVENT.size:
        raise RuntimeError(f"invalid socket monitor message: {msg!r}")
    event, value = _EVENT.unpack(msg[0])
    return {"event": zmq.Event(event), "value": value, "endpoint": msg[1]}
