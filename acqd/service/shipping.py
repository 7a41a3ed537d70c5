"""The daemon's side of shipping: the shipper's lifetime, the signals it needs, its events, commands and metrics.

``Shipping`` runs an ``acqd.share.ship.Shipper`` on the rig config's ``ship:`` destinations for the life of the
daemon. It listens to the daemon's own event bus (no hook in the supervisor): a ``mode`` event tells it whether a
session records (``while_recording: pause | throttle``), a ``job`` event that ends a finalize or an export queues
the session for the destinations whose ``after:`` says so. The shipper's events (ship_queued, ship_progress,
shipped, ship_failed, ship_refused) go onto that bus, so ``/api/events`` and the console see them.
The commands ``ship``, ``ship_status``, ``ship_retry``, ``ship_reverify`` (``SHIP_COMMANDS``, in the command table
of acqd.service.commands) and the ``acqd_ship_*`` metrics read it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, field_validator

from acqd.config import check_name
from acqd.errors import SessionError
from acqd.session import SESSION_FILE
from acqd.share.ship import Shipper
from acqd.share.ship.shipper import is_led, what_to_ship

log = logging.getLogger("acqd")
SHIP_EVENTS = ("ship_queued", "ship_progress", "shipped", "ship_failed", "ship_refused", "ship_webhook", "ship_deleted")
SWEEP_INTERVAL_S = 600.0
"""How often delete_after looks at every session (and after each verified copy)."""


class Shipping:
    """The shipper of a running daemon, fed by the daemon's event bus."""

    def __init__(self, sup: Any):
        self.sup = sup
        self.shipper = Shipper(sup.data_root, sup.cfg.ship, self._publish)
        self.counts: Counter = Counter()
        """shipped / ship_failed (final) / ship_refused since the daemon started."""
        self._wake = threading.Event()
        self._listener = sup.events.subscribe(self._wake.set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="ship-signals", daemon=True)

    def start(self) -> Shipping:
        self.shipper.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.sup.events.unsubscribe(self._listener)
        self._thread.join(5)
        self.shipper.stop()

    def _publish(self, kind: str, payload: dict) -> None:
        if kind in ("shipped", "ship_refused") or (kind == "ship_failed" and payload.get("final")):
            self.counts[kind] += 1
        self.sup.events.publish(kind, payload)

    def _follow(self) -> None:
        """Turn the daemon's events into the shipper's signals; sweep with delete_after now and then."""
        swept = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if time.monotonic() - swept > SWEEP_INTERVAL_S:
                swept = time.monotonic()
                self.shipper.sweep()
            while self._listener.queue:
                event = self._listener.queue.popleft()
                try:
                    self._on_event(event.type, event.data)
                except Exception:  # noqa: BLE001 - a bad event must not stop shipping
                    log.exception("shipping: handling a %s event", event.type)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "mode":
            self.shipper.set_recording(data.get("mode") == "RECORD")
        elif kind == "job" and data.get("state") == "done" and data.get("kind") in ("finalize", "export"):
            session = data["session"]
            sessions, exports = what_to_ship(list(self.shipper.dests.values()), data["kind"],
                                             is_led(self.sup.data_root / session))
            for name in sessions:
                self.shipper.ship(self.sup.data_root / session, to=name)
            if exports:
                report = self.sup.jobs[("export", session)].report
                self.shipper.ship_export(session, Path(report["out"]), [report["nwb"], *report["videos"]], exports)


def shipping_of(sup: Any) -> Shipping:
    shipping = sup.shipping
    if shipping is None:
        raise SessionError("no ship destinations in the rig config (ship:): nothing to ship to")
    return shipping


def start_shipping(sup: Any) -> Shipping | None:
    """The daemon's shipping, started (None when the rig config names no destination)."""
    return Shipping(sup).start() if sup.cfg.ship else None


# -- commands (HTTP and CLI) -----------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ShipRequest(_Request):
    """Queue a finalized session for one destination, or for every one."""

    session: str
    to: str | None = None
    """A destination's name (ship[].name); default: every destination."""

    @field_validator("session")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "session name")


class ShipJobRequest(_Request):
    id: int
    """The job's id (ship_status)."""


class ShipJobsResponse(_Response):
    jobs: list[dict]
    """id, session, destination (dest), state (queued|copying|verifying|verified|failed), attempts, bytes_total,
    bytes_done, error, times (created, started, finished, next_try, as Unix seconds)."""


class ShipStatusResponse(ShipJobsResponse):
    destinations: list[dict]
    queued_bytes: int
    oldest_unverified_age_s: float
    failed: int
    verified: int
    deletions: list[dict]
    """What delete_after would do with each local session now, and why (empty when no destination has it)."""


def _ship(sup: Any, req: ShipRequest) -> dict:
    folder = sup.data_root / req.session
    if not (folder / SESSION_FILE).is_file():
        raise SessionError(f"no session {req.session!r} under {sup.data_root}")
    try:
        jobs = shipping_of(sup).shipper.ship(folder, req.to)
    except KeyError as e:
        raise SessionError(e.args[0]) from None
    except ValueError as e:  # the destination's sessions: filter does not take this session
        raise SessionError(str(e)) from None
    return {"jobs": [j.as_dict() for j in jobs]}


def _job_op(op: str):
    def handler(sup: Any, req: ShipJobRequest) -> dict:
        try:
            job = getattr(shipping_of(sup).shipper, op)(req.id)
        except KeyError as e:
            raise SessionError(e.args[0]) from None
        except ValueError as e:
            raise SessionError(str(e)) from None
        return {"jobs": [job.as_dict()]}
    return handler


class _Empty(_Request):
    """No arguments."""


SHIP_COMMANDS: dict[str, tuple] = {
    # name: (request, response, handler, help, on_supervisor) -- acqd.service.commands.Command's fields
    "ship": (ShipRequest, ShipJobsResponse, _ship, "queue a finalized session for shipping (docs/shipping.md)", False),
    "ship_status": (_Empty, ShipStatusResponse, lambda sup, req: shipping_of(sup).shipper.status(),
                    "the ship queue: jobs, progress, failures", False),
    "ship_retry": (ShipJobRequest, ShipJobsResponse, _job_op("retry"), "queue a failed ship job again", False),
    "ship_reverify": (ShipJobRequest, ShipJobsResponse, _job_op("reverify"),
                      "hash a verified copy at its destination again", False),
}


# -- metrics -----------------------------------------------------------------------------------------------------


class ShipCollector:
    """``acqd_ship_*`` metric families, read from the queue at scrape time."""

    def __init__(self, sup: Any):
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        shipping = getattr(self.sup, "shipping", None)
        if shipping is None:
            return
        st = shipping.shipper.status()
        yield GaugeMetricFamily("acqd_ship_queued_bytes", "bytes still to ship (jobs not yet verified)",
                                value=st["queued_bytes"])
        yield GaugeMetricFamily("acqd_ship_oldest_unverified_age_seconds", "age of the oldest job not yet verified",
                                value=st["oldest_unverified_age_s"])
        yield GaugeMetricFamily("acqd_ship_failed_jobs", "jobs failed for good (acqd ship --retry)", value=st["failed"])
        verified = CounterMetricFamily("acqd_ship_verified", "copies verified at a destination since the daemon "
                                       "started", value=shipping.counts["shipped"])
        yield verified
        yield CounterMetricFamily("acqd_ship_failures", "ship jobs failed for good or refused since the daemon "
                                  "started", value=shipping.counts["ship_failed"] + shipping.counts["ship_refused"])


# -- the CLI's rendering -------------------------------------------------------------------------------------------


def status_lines(st: dict, deletions: bool = False) -> list[str]:
    """``acqd ship --status``: one line per job, the totals last; ``deletions`` (``--dry-run``): what delete_after
    would delete, and why, first."""
    lines = [f"{'would delete' if d['delete'] else 'keep':<12} {d['session']}: {d['reason']}"
             for d in st.get("deletions", [])] if deletions else []
    if deletions and not lines:
        lines.append("no destination has delete_after: nothing would be deleted")
    for j in st["jobs"]:
        done = f"{j['bytes_done'] / 1e6:.1f}/{j['bytes_total'] / 1e6:.1f} MB"
        rate = f" {j['speed_bytes_s'] / 1e6:.1f} MB/s" if j.get("speed_bytes_s") else ""
        eta = f" ETA {j['eta_s']:.0f} s" if j.get("eta_s") else ""
        error = f"  {j['error']}" if j.get("error") else ""
        lines.append(f"{j['id']:>4} {j['session']:<24} -> {j['dest']:<12} {j['state']:<9} {done}{rate}{eta}"
                     f" (attempt {j['attempts']}){error}")
    paused = [d["name"] for d in st["destinations"] if d["paused"]]
    lines.append(f"{st['verified']} verified, {st['failed']} failed, {st['queued_bytes'] / 1e6:.1f} MB to ship"
                 + (f"; paused while recording: {', '.join(paused)}" if paused else ""))
    return lines

