"""Who may send on a stream acqd binds on tcp: the ZAP authenticator of the writer's data socket.

Without it any process that can reach the port sends into the recording. ``allow_from`` admits peers by IP
address (loopback by default, so every local process); ``curve`` (acqd.config.CurveKeys) makes the socket a
CURVE server and admits only drivers whose public key is in ``client_keys_dir``. CURVE needs the ZAP handler:
without one libzmq accepts any client key (design.md). Every refusal is logged by pyzmq's authenticator, from
its own thread; ``Refusals`` turns those log lines into (address, reason) pairs for the writer's
``peer_refused`` events, in the order the handshakes failed.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import zmq

from acqd.config import StreamConfig

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = b"acqd"


class Refusals(logging.Handler):
    """The authenticator's refusals as (address, reason); deque appends are thread-safe."""

    def __init__(self, cfg: StreamConfig):
        super().__init__(logging.DEBUG)
        self.cfg = cfg
        self.pending: deque[tuple[str, str]] = deque(maxlen=1000)
        self._address = "an unknown address"

    def emit(self, record: logging.LogRecord) -> None:
        text, args = record.getMessage(), record.args or ()
        if text.startswith("version:") and len(args) >= 4:  # each request is logged first, with its address
            self._address = str(args[3])
        elif text.startswith("DENIED (CURVE)") and self.cfg.curve is not None:
            key = args[-1].decode(errors="replace") if isinstance(args[-1], bytes) else str(args[-1])
            self.pending.append((self._address, f"its CURVE key {key} is not in client_keys_dir "
                                                f"{str(self.cfg.curve.client_keys_dir)!r}"))
        elif text.startswith("DENIED") and args:
            self.pending.append((str(args[0]), f"not in allow_from {list(self.cfg.allow_from)}"))

    def next(self) -> tuple[str, str]:
        return self.pending.popleft() if self.pending else ("an unknown address", "refused by the authenticator")


def authenticate(ctx: zmq.Context, sock: zmq.Socket, cfg: StreamConfig) -> tuple[ThreadAuthenticator, Refusals]:
    """Start the ZAP handler for ``sock`` (before it binds) from the stream's ``allow_from`` and ``curve``."""
    # Imported here: pyzmq's authenticator imports asyncio and ssl (~15 ms of CPU), and only a writer that binds
    # on tcp has one; the others (ipc, or connecting to their driver) start without.
    from zmq.auth import load_certificate
    from zmq.auth.thread import ThreadAuthenticator

    log = logging.getLogger(f"acqd.zap.{cfg.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    refusals = Refusals(cfg)
    log.addHandler(refusals)
    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.allow(*cfg.allow_from)
    if cfg.curve is not None:
        public, secret = load_certificate(cfg.curve.secret_key_file)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=str(cfg.curve.client_keys_dir))  # not "*": keys are
        # looked up by the socket's ZAP domain, and under "*" every key was refused as "Unknown domain"
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # NULL-mechanism peers go through ZAP only with a domain
    return auth, refusals
