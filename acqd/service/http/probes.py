"""The console's probe view API (``/api/console/probes``): layouts, live features on the session timebase, the block.

This module owns what the probe view reads besides the preview stream: each ephys stream's sites (channel, position
in um, shank, brain area) from its probe file (acqd.metadata.probes, probeinterface) or, without one, a plain
channel grid; the latest probe features its writer sent (acqd.record.probeview), parsed here only when a page asks
(the supervisor forwards previews unparsed), with the crossings' times put on the session timebase (seconds since
RECORD's start, or since ACQUIRE's before: ``t_offset`` of the message, acqd.record.preview.HostClock), dead and
noisy sites by thresholds the caller may set, the stale flag and age, and the filter and decimation settings; and
the choice of the trace block (at most 64 channels, one band) for every page watching.

Times are the host's display clock (within a few ms), the same clock as annotations' ``monotonic_ns``: a camera
frame, a NIDAQ sample, a spike and a note line up in the console; the NWB's own alignment is finalize's fit.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import numpy as np
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from acqd.config import ChannelSync, RigConfig, StreamConfig, electrode_columns
from acqd.metadata.probes import contact_columns, read_layout
from acqd.record.probeview import BANDS, MAX_BLOCK, settings
from acqd.service.supervisor import Supervisor

STALE_S = 2.0
"""A stream whose latest preview is older than this is stale (its picture is shown greyed, with its age)."""
DEAD_BELOW = 0.2
"""Default: a site whose AP-band RMS is below this fraction of the probe's median is dead."""
NOISY_ABOVE = 3.0
"""Default: a site whose AP-band RMS is above this multiple of the probe's median is noisy."""
GRID_PITCH_UM = 20.0
"""Without a probe file: channels drawn as a grid of two columns, this far apart (positions are not known)."""


class BlockRequest(BaseModel):
    """The trace block the probe view draws: channels (at most 64) and one band."""

    model_config = ConfigDict(extra="forbid")
    channels: list[int] = Field(min_length=1, max_length=MAX_BLOCK)
    band: str = Field("ap", pattern="^(" + "|".join(BANDS) + ")$")


def ephys_streams(cfg: RigConfig) -> list[StreamConfig]:
    return [s for s in cfg.streams if s.kind == "ephys" and len(s.shape) == 1]


def sites(s: StreamConfig, areas: dict | None) -> dict:
    """Each electrode channel's site: channel, contact id, x and y (um), shank, area; ``layout`` says whether the
    positions come from a probe file or are a plain grid."""
    cols = electrode_columns(s)
    per_channel = list((areas or {}).get("channel_locations") or [])
    area = (areas or {}).get("location")
    if s.probe is not None:
        layout = read_layout(s.probe.file, s.probe.format)
        contact = contact_columns(layout, cols)
        rows = [{"channel": c, "contact": layout.contact_ids[contact[c]], "x": layout.x[contact[c]],
                 "y": layout.y[contact[c]], "shank": layout.shanks[contact[c]]} for c in cols]
        kind = "probe"
    else:
        rows = [{"channel": c, "contact": str(c), "x": (i % 2) * GRID_PITCH_UM, "y": (i // 2) * GRID_PITCH_UM,
                 "shank": "0"} for i, c in enumerate(cols)]
        kind = "grid"
    for i, r in enumerate(rows):
        r["area"] = per_channel[i] if i < len(per_channel) else area
    shanks = list(dict.fromkeys(r["shank"] for r in rows))
    return {"layout": kind, "sites": rows, "shanks": shanks, "pitch_um": site_pitch(rows)}


def site_pitch(rows: list[dict]) -> float:
    """The smallest vertical distance between two sites' rows of one shank (um): what "one site" means in depth."""
    ys = sorted({r["y"] for r in rows})
    steps = np.diff(ys)
    return float(steps[steps > 0].min()) if (steps > 0).any() else GRID_PITCH_UM


def classify(ap_rms: list, dead_below: float, noisy_above: float) -> tuple[list[int], list[int], float | None]:
    """(dead channels, noisy channels, median AP RMS): AP-band RMS below ``dead_below`` x / above ``noisy_above`` x
    the median of the probe's channels (null entries, the sync word, are no site)."""
    values = np.array([np.nan if v is None else v for v in ap_rms or ()], float)
    if not np.isfinite(values).any():
        return [], [], None
    med = float(np.nanmedian(values))
    with np.errstate(invalid="ignore"):
        dead = np.flatnonzero(values < dead_below * med).tolist()
        noisy = np.flatnonzero(values > noisy_above * med).tolist()
    return dead, noisy, med


def uv_per_unit(s: StreamConfig) -> float | None:
    """µV per raw unit of a stream in volts (None in other units)."""
    return abs(s.conversion) * 1e6 if s.units in ("V", "volts") else None


def features(s: StreamConfig, latest: tuple[float, bytes] | None, dead_below: float, noisy_above: float,
             now: float, origin: float | None = None) -> dict:
    """The probe view's numbers of ``s`` from its latest preview (``latest``: when it came, the raw message);
    ``origin``: the session timebase's zero in host monotonic seconds (``now_s`` and ``origin_s`` of the reply let a
    page put anything timed by ``monotonic_ns``, an annotation, on the same axis)."""
    out = {"stream": s.name, "origin_s": origin, "now_s": None if origin is None else round(now - origin, 3),
           "units": s.units, "uv_per_unit": uv_per_unit(s), "settings": settings(s.rate),
           "thresholds": {"dead_below": dead_below, "noisy_above": noisy_above},
           "stale": True, "age_s": None, "features": None}
    if latest is None:
        return out
    at, raw = latest
    msg = json.loads(raw)
    out["age_s"] = round(now - at, 2)
    out["stale"] = now - at > STALE_S
    probe = msg.get("probe")
    if probe is None:
        return out
    offset = msg.get("t_offset")
    samples = np.asarray(probe["crossings"]["samples"], np.float64)
    dead, noisy, median = classify(probe["ap_rms"], dead_below, noisy_above)
    out["timebase"] = "session" if offset is not None else "device"
    out["features"] = {
        "ap_rms": probe["ap_rms"], "lfp_rms": probe["lfp_rms"], "rates": probe["rates"],
        "threshold": probe["threshold"], "analysed_s": probe["analysed_s"], "median_ap_rms": median,
        "crossings": {"t": np.round(samples / s.rate + (offset or 0.0), 5).tolist(),
                      "channels": probe["crossings"]["channels"], "dropped": probe["crossings"]["dropped"]},
        "dead": dead, "noisy": noisy, "t_offset": offset, "block": probe["block"],
    }
    return out


def probes_router(sup: Supervisor) -> APIRouter:
    router = APIRouter(prefix="/api/console/probes", tags=["console"])
    cfg = sup.cfg
    streams = {s.name: s for s in ephys_streams(cfg)}

    def stream(name: str) -> StreamConfig:
        if name not in streams:
            raise HTTPException(404, f"no ephys stream {name!r} (ephys streams: {', '.join(streams) or 'none'})")
        return streams[name]

    def areas(name: str) -> dict | None:
        session = sup.session or {}
        return ((session.get("metadata") or {}).get("ecephys") or {}).get(name) or \
            (cfg.metadata.get("ecephys") or {}).get(name)

    @lru_cache(maxsize=None)
    def layout(name: str) -> dict:  # the probe file was checked when the config was loaded: read it once
        return sites(streams[name], areas(name))

    @router.get("")
    def probes() -> dict:
        """Every ephys stream's sites (positions in um, shanks, areas) and the view's settings."""
        return {"probes": [{"stream": n, "rate": s.rate, "uv_per_unit": uv_per_unit(s),
                            "sync_channel": s.sync.channel if isinstance(
            s.sync, ChannelSync) else None, **layout(n), "settings": settings(s.rate)} for n, s in streams.items()],
            "stale_s": STALE_S, "dead_below": DEAD_BELOW, "noisy_above": NOISY_ABOVE}

    @router.get("/{name}")
    def probe(name: str, dead_below: float = Query(DEAD_BELOW, ge=0, le=1),
              noisy_above: float = Query(NOISY_ABOVE, ge=1, le=100)) -> dict:
        """The latest features of ``name`` (while a page watches the preview): RMS per band and channel, rates,
        the crossings of the window on the session timebase, dead and noisy sites, stale flag and age."""
        return features(stream(name), sup.previews.latest(name), dead_below, noisy_above, time.monotonic(),
                        sup.previews.origin)

    @router.put("/{name}/block")
    def block(name: str, req: BlockRequest) -> dict:
        """The trace block every page's probe view of ``name`` draws (the writer filters only these channels)."""
        s = stream(name)
        bad = [c for c in req.channels if c not in electrode_columns(s)]
        if bad:
            raise HTTPException(422, f"channel(s) {bad[:8]} are no electrode channel of {name!r} "
                                     f"(0..{s.shape[0] - 1} less the sync word)")
        sup.previews.select_block(name, req.channels, req.band)
        return {"stream": name, "channels": req.channels, "band": req.band}

    return router
