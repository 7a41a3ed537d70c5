"""``GET /metrics``: Prometheus metrics read from the status snapshot at scrape time (prometheus_client).

A custom collector turns the snapshot into metric families, so a scrape never touches the supervisor thread
and no counter is kept twice. Counters count since the writers started (ACQUIRE): they reset when acquisition
restarts, which Prometheus' ``rate()`` handles. Names (docs/control-api.md "Metrics"):
``acqd_mode``, ``acqd_disk_free_bytes``, ``acqd_disk_time_left_seconds``, ``acqd_write_bytes_per_second``,
``acqd_stream_{samples,bytes,messages,gaps,rejects}_total``, ``acqd_stream_last_message_age_seconds``,
``acqd_stream_writer_restarts_total``, ``acqd_stream_connected``, ``acqd_stream_up``, ``acqd_stream_sync_locked`` and
``acqd_stream_sync_drift_ppm`` (synced streams while recording: acqd.service.synclock), ``acqd_snapshot_age_seconds``,
``acqd_incidents_total``, ``acqd_build_info``, the load gauges of acqd.service.overload
(``acqd_stream_{behind,flush,flush_max}_seconds``, ``acqd_stream_{backlog,pending}_messages``,
``acqd_stream_encoder_backlog_frames``, ``acqd_stream_overloaded``, ``acqd_stream_lost_messages_total``); and prometheus_client's own ``process_*`` (the daemon process:
CPU seconds, resident memory, open files) and ``python_info``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import Response
from importlib.metadata import version
from platform import python_version

import h5py
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from acqd.service.overload import load_metrics
from acqd.service.rig import NodeLabelled, NodesCollector
from acqd.service.shipping import ShipCollector
from acqd.service.supervisor import Supervisor

MODES = ("IDLE", "ACQUIRE", "RECORD")
DOWN_STATES = ("failed", "stopped_failed", "stopped", "hung")
BUILD_INFO = {"version": version("acqd"), "python": python_version(), "h5py": h5py.version.version,
              "hdf5": h5py.version.hdf5_version, "pynwb": version("pynwb"), "pyzmq": version("pyzmq")}


class SnapshotCollector:
    """Metric families from ``sup.snapshot`` (prometheus_client's custom-collector protocol)."""

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        snap = self.sup.snapshot
        st = snap.status
        mode = GaugeMetricFamily("acqd_mode", "1 for the daemon's current mode", labels=["mode"])
        for m in MODES:
            mode.add_metric([m], 1.0 if st["mode"] == m else 0.0)
        yield mode
        yield GaugeMetricFamily("acqd_disk_free_bytes", "free bytes on the data root's file system",
                                value=st["disk_free_bytes"] if st["disk_free_bytes"] is not None else float("nan"))
        left = st.get("disk_time_left_s")
        yield GaugeMetricFamily("acqd_disk_time_left_seconds", "time until the disk is full at the current write "
                                "rate (+Inf when not writing)", value=float("inf") if left is None else left)
        yield GaugeMetricFamily("acqd_write_bytes_per_second", "bytes per second being recorded",
                                value=st.get("write_bytes_per_s", 0))
        yield GaugeMetricFamily("acqd_snapshot_age_seconds", "age of the status snapshot",
                                value=time.monotonic() - snap.monotonic)
        yield CounterMetricFamily("acqd_incidents", "incidents raised (gaps, rejects, restarts, disk, ...)",
                                  value=st.get("incident_count", 0))
        yield InfoMetricFamily("acqd_build", "versions of acqd and of the libraries its files depend on",
                               value=BUILD_INFO)
        families = {
            "samples": CounterMetricFamily("acqd_stream_samples", "samples received", labels=["stream"]),
            "bytes": CounterMetricFamily("acqd_stream_bytes", "bytes received", labels=["stream"]),
            "messages": CounterMetricFamily("acqd_stream_messages", "messages received", labels=["stream"]),
            "gaps": CounterMetricFamily("acqd_stream_gaps", "sequence gaps (lost messages)", labels=["stream"]),
        }
        rejects = CounterMetricFamily("acqd_stream_rejects", "messages rejected", labels=["stream", "reason"])
        restarts = CounterMetricFamily("acqd_stream_writer_restarts", "writer restarts", labels=["stream"])
        age = GaugeMetricFamily("acqd_stream_last_message_age_seconds", "seconds since the last message (+Inf: none)",
                                labels=["stream"])
        connected = GaugeMetricFamily("acqd_stream_connected", "1 while a driver is connected", labels=["stream"])
        up = GaugeMetricFamily("acqd_stream_up", "1 while the stream's writer runs", labels=["stream"])
        locked = GaugeMetricFamily("acqd_stream_sync_locked", "1 while the live sync lock holds, 0 when not (synced "
                                   "streams while recording)", labels=["stream", "state"])
        drift = GaugeMetricFamily("acqd_stream_sync_drift_ppm", "clock drift against the reference, live (ppm)",
                                  labels=["stream"])
        for name, s in st["streams"].items():
            total = s.get("total") or {}
            for key, fam in families.items():
                fam.add_metric([name], total.get(key, 0))
            for reason, n in (total.get("rejected") or {}).items():
                rejects.add_metric([name, reason], n)
            restarts.add_metric([name], s["restarts"])
            age.add_metric([name], float("inf") if s["silent_s"] is None else s["silent_s"])
            connected.add_metric([name], 1.0 if s["connected"] else 0.0)
            up.add_metric([name], 0.0 if s["state"] in DOWN_STATES else 1.0)
            if sync := s.get("sync"):
                locked.add_metric([name, sync["state"]], 1.0 if sync["state"] == "locked" else 0.0)
                if sync["drift_ppm"] is not None:
                    drift.add_metric([name], sync["drift_ppm"])
        yield from (*families.values(), rejects, restarts, age, connected, up, locked, drift)
        yield from load_metrics(st["streams"])


def metrics_router(sup: Supervisor) -> APIRouter:
    router = APIRouter(tags=["metrics"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeLabelled(SnapshotCollector(sup), sup.cfg.node))  # node: this PC in a rig of several
    registry.register(NodeLabelled(ShipCollector(sup), sup.cfg.node))
    registry.register(NodesCollector(sup))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)

    @router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
