"""What the daemon shows of each writer's load (issue 24 item 2; the writer measures it: acqd.record.load).

``overload_status`` is one stream's share of ``Supervisor.status()``: its ``load`` (receive backlog, flush
latency, encoder backlog), what it sheds, what it lost by reason, and a camera's encoder progress while a stop
waits for it. ``load_cell`` and ``load_lines`` render it for ``acqd status``; ``load_metrics`` for Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where the metrics are made: ``acqd status`` renders the load without Prometheus
    from prometheus_client.core import Metric

GAUGES = (("behind_s", "acqd_stream_behind_seconds", "seconds the writer's data socket has not been found empty"),
          ("backlog_messages", "acqd_stream_backlog_messages",
           "messages handled since the data socket was last empty (a lower bound of the receive backlog)"),
          ("pending_messages", "acqd_stream_pending_messages", "messages received, not yet committed by a flush"),
          ("flush_s", "acqd_stream_flush_seconds", "duration of the writer's last flush"),
          ("flush_max_s", "acqd_stream_flush_max_seconds", "longest flush in the last stats window"),
          ("encoder_backlog", "acqd_stream_encoder_backlog_frames", "frames waiting for a camera's video encoder"))


def overload_status(stats: dict, recording_counts: dict, closing: dict) -> dict:
    """The overload fields of one stream's status entry (docs/control-api.md)."""
    return {"load": stats.get("load") or {}, "shedding": stats.get("shedding") or [],
            "lost": recording_counts.get("lost") or {}, "closing": closing or None}


def load_cell(s: dict) -> str:
    """The ``load`` column of ``acqd status``: ``ok``, or how far behind (``enc`` for a camera's encoder)."""
    load = s.get("load") or {}
    if s.get("closing"):
        return f"enc{s['closing'].get('encoder_backlog') or 0}"
    if not load:
        return "-"
    if not load.get("overloaded"):
        return "ok"
    return f"{load.get('behind_s', 0):.0f}s" if load.get("behind_s") else "enc" if load.get("encoder_backlog") else "busy"


def load_lines(streams: dict) -> Iterator[str]:
    """One line per stream that is behind, shedding, closing or has lost messages, for ``acqd status``."""
    for name, s in streams.items():
        load, lost = s.get("load") or {}, {k: v for k, v in (s.get("lost") or {}).items() if v}
        if not (load.get("overloaded") or s.get("shedding") or s.get("closing") or lost):
            continue
        words = []
        if load.get("overloaded"):
            words.append(f"behind {load.get('behind_s', 0):.1f} s, {load.get('backlog_messages', 0)} msgs, "
                         f"flush {load.get('flush_max_s', 0):.2f} s")
        if load.get("encoder_limit"):
            words.append(f"encoder {load.get('encoder_backlog', 0)}/{load['encoder_limit']} frames")
        if s.get("closing"):
            words.append(f"closing: encoder {s['closing'].get('encoder_backlog')} frames to go")
        if s.get("shedding"):
            words.append("shedding " + ", ".join(s["shedding"]))
        if lost:
            words.append("lost " + ", ".join(f"{n} {why}" for why, n in lost.items()))
        yield f"{name}: " + "; ".join(words)


def load_metrics(streams: dict) -> Iterator[Metric]:
    """Per-stream load gauges, the overload flag and messages lost by reason."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families = {key: GaugeMetricFamily(metric, text, labels=["stream"]) for key, metric, text in GAUGES}
    overloaded = GaugeMetricFamily("acqd_stream_overloaded", "1 while the writer is behind and sheds non-data work",
                                   labels=["stream"])
    lost = CounterMetricFamily("acqd_stream_lost_messages", "messages lost in recorded gaps, by reason",
                               labels=["stream", "reason"])
    for name, s in streams.items():
        load = s.get("load") or {}
        for key, fam in families.items():
            fam.add_metric([name], float(load.get(key) or 0))
        overloaded.add_metric([name], 1.0 if load.get("overloaded") else 0.0)
        for reason, n in (s.get("lost") or {}).items():
            lost.add_metric([name, reason], n)
    yield from (*families.values(), overloaded, lost)
