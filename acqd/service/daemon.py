"""The ``acqd serve`` process main: logging, the supervisor on the main thread, uvicorn on another, signals.

It builds the supervisor and the HTTP app (``acqd.service.http.app``), waits until the API listens, tells systemd
it is ready (and pings its watchdog from the supervisor loop), starts LabRecorder's remote control when the config
asks for it, and on SIGTERM or SIGINT closes the session and every file before it exits. The only module of the
service that imports ``acqd.service.http``: it is the top that joins the daemon and its protocols.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import uvicorn

from acqd.config import RigConfig
from acqd.errors import SessionError
from acqd.service import systemd
from acqd.service.http.app import create_app
from acqd.service.http.labrecorder import start_listener
from acqd.service.http.serverlimits import server_protocol
from acqd.service.logs import setup_logging
from acqd.service.rig import start_rig
from acqd.service.shipping import start_shipping
from acqd.service.supervisor import Supervisor

log = logging.getLogger("acqd")
LIMIT_CONCURRENCY = 512
"""Connections open at once; beyond it requests get 503 at once instead of queueing without bound. uvicorn
counts open connections, not busy ones, so this is well above a burst of 300 clients. Sync routes (commands)
share anyio's worker pool (40 threads); read routes are async and never take a worker."""
BACKLOG = 1024


def serve(cfg: RigConfig, ready_file: str | None = None, acquire: bool = False, log_format: str = "auto") -> int:
    """Run the daemon until SIGTERM or SIGINT: supervisor on the main thread, uvicorn on another."""
    setup_logging(log_format)
    sup = Supervisor(cfg)
    ctl = cfg.daemon.control
    stop = threading.Event()

    def request_stop(*_: object) -> None:
        systemd.notify("STOPPING=1")
        stop.set()

    app = create_app(sup, ctl, cfg, request_stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=ctl.host, port=ctl.port, limit_concurrency=LIMIT_CONCURRENCY, backlog=BACKLOG, lifespan="off",
        log_config=None, access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=3, server_header=False,
        http=server_protocol(ctl)))
    http = threading.Thread(target=server.run, name="acqd-http", daemon=True)
    http.start()
    deadline = time.monotonic() + 30
    while not server.started and http.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sup.shutdown()
        raise SessionError(f"the control API cannot listen on {ctl.host}:{ctl.port} (in use, or not an address "
                           f"of this machine)")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    ready = {"url": url, "pid": os.getpid(), "data_root": str(sup.data_root)}
    if cfg.daemon.labrecorder is not None:  # LabRecorder's remote control socket (docs/lsl.md)
        ready["labrecorder_port"] = start_listener(sup, cfg.daemon.labrecorder).port
    if acquire:
        sup.acquire()  # before READY: a unit that starts acquiring is ready once its writers are
    # Before READY too: a `ship` sent the moment the daemon was ready was refused with "no ship destinations".
    sup.shipping = start_shipping(sup)  # the ship queue, when the rig config has ship: destinations
    sup.rig = start_rig(sup, url)  # a leader watches and drives its followers (acqd.service.rig)
    sup.on_tick = systemd.Watchdog(systemd.watchdog_interval_s()).ping
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            json.dump(ready, f)
        os.replace(ready_file + ".tmp", ready_file)
    log.info("serving %s (data root %s)", url, sup.data_root)
    systemd.notify(f"READY=1\nSTATUS=serving {url}")
    try:
        sup.serve(stop)
    finally:
        if sup.rig is not None:
            sup.rig.stop()
        if sup.shipping is not None:
            sup.shipping.stop()
        app.state.closing.set()
        server.should_exit = True
        http.join(10)
    log.info("stopped")
    return 0
