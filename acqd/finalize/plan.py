"""The plan of the master NWB file, and each stream's report, from the aligned streams.

This module owns what goes into the master (docs/finalize.md "The NWB layout"): one series per stream with
its timing, description and comments, the events, the gaps table, the ``processing/sync`` tables (clock fits,
timebase, frame reconciliation), the session metadata and notes, the stimulus streams' image sets and the
attached photos (``acqd.images``). It makes plain ``acqd.finalize.masterplan``
dataclasses; ``acqd.finalize.nwb`` (the only pynwb importer) builds the file from them.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from acqd.finalize import lsl
from acqd.finalize.clock import ClockFit
from acqd.finalize.masterplan import (AnnotationsPlan, ImagePlan, MasterPlan, SeriesPlan, StimulusPlan, TablePlan,
                                      Timing, nwbfile_fields)
from acqd.finalize.electrodes import electrodes_plan
from acqd.config import ChannelSync, StreamConfig
from acqd.errors import ConfigError, FinalizeError
from acqd.images import attachments, session_stimulus_images
from acqd.finalize.layout import rel
from acqd.finalize.report import StreamReport
from acqd.session import read_annotations
from acqd.finalize.streams import Stream
from acqd.finalize.timing import (Alignment, extrapolated_rows, row_times, series_timing, stream_events, stream_gaps,
                                  wall_time)


def plan_master(folder: Path, session: dict, streams: dict[str, Stream], aligned: dict[str, Alignment], ref: Stream,
                zero_sample: int, linked: dict[str, Path]) -> tuple[MasterPlan, dict[str, StreamReport]]:
    """The master's plan and each stream's report; ``linked`` is the file each stream's series links."""
    zero_s = zero_sample / ref.rate
    meta = session.get("metadata", {})
    series, events, gaps, reports = [], [], [], {}
    for name, s in streams.items():
        a = aligned[name]
        timing, flags, video = series_timing(s, a.fit, zero_s), list(a.flags), None
        if s.cfg.video is not None:
            files, starts, rows, problems = s.video_frames()
            missing = [f for f in files if not (folder / f).is_file()]
            if missing or not files:
                raise FinalizeError(f"stream {name!r}: video files missing: {missing or 'no finished file'}")
            video, flags = {"files": files, "starting_frames": starts}, flags + problems
            if len(rows) != s.rows:  # some committed frames are in no file: the series holds the others
                timing = Timing(rows=len(rows), timestamps=row_times(s, a.fit, zero_s, rows))
        gaps_of_s = stream_gaps(s, a.fit, zero_s)
        gaps += gaps_of_s
        events += stream_events(s, a.fit, zero_s)
        first_s = float(row_times(s, a.fit, zero_s)(0, 1)[0])
        reports[name] = StreamReport(
            name=name, kind=s.cfg.kind, rows=s.rows, parts=[rel(p.path, folder) for p in s.parts],
            recovered=[rel(p.link, folder) for p in s.parts if p.recovered], linked=rel(linked[name], folder),
            series_rows=timing.rows, timing="rate" if timing.regular else "timestamps", first_time_s=first_s,
            clock={**a.fit.to_dict(), "extrapolated_rows": extrapolated_rows(s, a.fit)}, flags=flags,
            gaps=gaps_of_s, frames=a.frames, video=video, lsl=a.lsl)
        if lsl.is_events(s.cfg):  # markers: an events table, not a series
            events.append(lsl.events_plan(s, a.fit, zero_s, row_times(s, a.fit, zero_s)))
            reports[name].timing = "events"
            continue
        series.append(_with_stimulus(_series_plan(s, a.fit, flags, timing, linked[name], gaps_of_s, video, meta),
                                     s.cfg, folder))
    start_time = wall_time(ref, zero_sample)
    plan = MasterPlan(
        identifier=session["session_id"], session_id=session["session_id"],
        session_description=meta.get("session_description") or session["session_id"],
        session_start_time=start_time, file_create_date=_parse_time(session.get("stopped") or session["created"]),
        subject=meta.get("subject", {}), experimenter=tuple(meta.get("experimenter") or ()),
        institution=meta.get("institution"), lab=meta.get("lab"),
        experiment_description=meta.get("experiment_description"), keywords=tuple(meta.get("keywords") or ()),
        notes="\n\n".join(filter(None, (meta.get("notes"), _notes(ref, zero_sample, session)))),
        general=nwbfile_fields(meta), series=series, events=events,
        gaps=_gap_table(gaps) if gaps else None,
        sync_tables=_sync_tables(streams, aligned, reports, ref, zero_sample),
        annotations=_annotations(read_annotations(folder), ref, zero_sample, start_time,
                                 session.get("reference") == ref.name and streams[ref.name].n_segments == 1),
        attachments=_attachments(folder))
    return plan, reports


def _with_stimulus(p: SeriesPlan, cfg: StreamConfig, folder: Path) -> SeriesPlan:
    """A stimulus stream's plan gets its registered image set (index streams) or its optics (frame streams)."""
    stim = cfg.stimulus
    if stim is None:
        return p
    images: tuple[ImagePlan, ...] = ()
    if stim.images is not None:
        try:
            pixels = session_stimulus_images(folder, cfg.name)
        except ConfigError as e:
            raise FinalizeError(f"stimulus stream {cfg.name!r}: its image set was not registered at RECORD: {e}") from None
        images = tuple(ImagePlan(name=f"{i:04d}_{n}", pixels=px, description=f"image {i} of {cfg.name} ({n})")
                       for i, (n, px) in enumerate(pixels))
    return replace(p, stimulus=StimulusPlan(images=images, field_of_view=stim.field_of_view,
                                                distance=stim.distance, orientation=stim.orientation))


def _attachments(folder: Path) -> tuple[ImagePlan, ...]:
    """The photos attached with ``acqd attach``, described as their sidecars say (who and when included)."""
    try:
        found = attachments(folder)
    except ConfigError as e:
        raise FinalizeError(f"an attachment cannot be read: {e}") from None
    return tuple(ImagePlan(name=m["name"], pixels=px, resolution=m.get("resolution"),
                               description=f"{m['description']} (attached by {m['attached_by']} at {m['attached_at']})")
                 for m, px in found)


def _annotations(notes: list[dict], ref: Stream, zero_sample: int, start_time: datetime, by_sample: bool = True
                 ) -> AnnotationsPlan | None:
    """Notes on the session timebase: by the reference sample counter, or by host time when it had no data yet, or
    when that counter is not the timebase's (``by_sample`` False: the configured reference's counter was reset)."""
    if not notes:
        return None
    times, samples = [], []
    for n in notes:
        sample = n.get("reference_sample")
        if sample is None or not by_sample:
            times.append(n["host_time_ns"] / 1e9 - start_time.timestamp())
            samples.append(-1)
        else:
            times.append((int(sample) - zero_sample) / ref.rate)
            samples.append(int(sample))
    order = np.argsort(times, kind="stable")  # a table of events is read in time order
    return AnnotationsPlan(timestamps=np.array(times)[order], texts=[str(notes[i]["text"]) for i in order],
                               reference_samples=np.array(samples, dtype=np.int64)[order],
                               host_times=[str(notes[i]["taken_at"]) for i in order], resolution=1.0 / ref.rate)


def _series_plan(s: Stream, fit: ClockFit, flags: list[str], timing: Timing, linked: Path, gaps: list[dict],
                 video: dict | None, meta: dict) -> SeriesPlan:
    cfg = s.cfg
    channels = tuple(cfg.channel_names or (f"ch{i:03d}" for i in range(cfg.shape[0])))
    digital = sorted({cfg.sync.channel} if isinstance(cfg.sync, ChannelSync) else set())
    comments = (f"time: {fit.source} clock ({fit.model}), error bound {fit.error_bound_s * 1e3:.3g} ms, "
                f"{fit.n_pairs} pairs, drift {fit.drift_ppm:+.2f} ppm; "
                + (f"{len(gaps)} gap(s), see /intervals/gaps" if gaps else "no gaps")
                + "".join(f"; {flag}" for flag in flags))
    described = cfg.description or cfg.name
    if len(cfg.shape) == 1:
        described += f"; columns: {', '.join(channels)}"
    if digital:
        described += f"; column(s) {digital} are digital words (bits), not {cfg.units}"
    kind = cfg.kind if not (cfg.kind == "ephys" and cfg.units != "volts") else "analog"
    if video is not None:
        described += f"; frames in external {cfg.video.codec} video files"
    return SeriesPlan(name=cfg.name, kind=kind, data_file=None if video else linked, sync_file=linked,
                          unit=cfg.units, conversion=float(cfg.conversion), offset=float(cfg.offset),
                          description=described, comments=comments, timing=timing,
                          channel_names=channels if len(cfg.shape) == 1 else (), sync_channels=tuple(digital),
                          device_description=cfg.description,
                          external_files=tuple(video["files"]) if video else (),
                          starting_frames=tuple(video["starting_frames"]) if video else (),
                          electrodes=electrodes_plan(cfg, channels, (meta.get("ecephys") or {}).get(cfg.name) or {},
                                                     (meta.get("subject") or {}).get("species"))
                          if kind == "ephys" and len(cfg.shape) == 1 else None)


def _gap_table(gaps: list[dict]) -> TablePlan:
    desc = {"start_time": "session time where the missing samples would have started",
            "stop_time": "session time of the first sample after the gap",
            "stream": "stream with the gap", "kind": "seq (messages lost), samples (device skipped), restart "
            "(publisher restarted), counter_reset, resync, dropped (received, not stored: see reason), writer_restart (a new "
            "part file), unrecorded",
            "row": "file row of the first sample after the gap in the stream's data",
            "sample_from": "device sample where the gap starts", "sample_to": "device sample after the gap",
            "samples_lost": "samples missing (-1: unknown, the counter was reset)",
            "seq_from": "first missing message seq (-1: not recorded)", "seq_to": "seq after the gap (-1: not recorded)",
            "reason": "why: source (device/driver), transport, hwm (ZeroMQ high-water mark), overload (the writer "
                      "was behind), disk, encoder (a camera's encoder was behind), writer (restart), unknown"}
    gaps = sorted(gaps, key=lambda g: (g["start_time"], g["stream"]))
    return TablePlan("gaps", "every discontinuity in a stream's data, proven by its chunk index: the samples "
                         "between start_time and stop_time were never recorded",
                         {k: (d, [g[k] for g in gaps]) for k, d in desc.items()})


def _sync_tables(streams: dict[str, Stream], aligned: dict[str, Alignment], reports: dict[str, StreamReport],
                 ref: Stream, zero_sample: int) -> list[TablePlan]:
    names = list(streams)
    fits = {n: aligned[n].fit.to_dict() for n in names}
    cols = {"stream": ("stream name", names),
            "source": ("reference | sync (shared TTL edges) | strobe (camera strobes) | host (receive times)",
                       [fits[n]["source"] for n in names]),
            "model": ("affine or piecewise (continuous piecewise-linear)", [fits[n]["model"] for n in names])}
    numeric = {"segments": "counter segments", "counter_resets": "device counter resets", "n_pairs": "pairs fitted",
               "unmatched_dev": "device edges without a reference partner", "unmatched_ref":
               "reference edges without a device partner", "drift_ppm": "rate error vs nominal (positive: fast)",
               "residual_rms_s": "RMS fit residual (s)", "residual_max_s": "largest fit residual (s)",
               "error_bound_s": "bound on the map's error over every row of the stream, the extrapolated ones "
                                "included (s)",
               "rejected_pairs": "edge pairs dropped as outliers or spurious after the first fit",
               "extrapolation_ppm": "growth of the error bound beyond the end knots (ppm of the elapsed time)"}
    for key, d in numeric.items():
        cols[key] = (d, np.array([fits[n][key] for n in names]))
    cols["pairing"] = ("how sync edges were paired: intervals, or intervals + host prior (regular trains)",
                       [fits[n]["pairing"] for n in names])
    cols["host_segments"] = ("counter segments timed by host receive times because their edges could not be "
                             "fitted (comma-separated)", [",".join(map(str, fits[n]["host_segments"])) for n in names])
    cols["extrapolated_rows"] = ("rows before the first or after the last paired edge of their counter segment "
                                 "(covered by error_bound_s through extrapolation_ppm)",
                                 np.array([reports[n].clock["extrapolated_rows"] for n in names], dtype=np.int64))
    cols["timing"] = ("rate: starting_time + rate; timestamps: one per row", [reports[n].timing for n in names])
    cols["n_gaps"] = ("gaps in the stream (see /intervals/gaps)", np.array([len(reports[n].gaps) for n in names]))
    cols["flags"] = ("what an analyst must know about this stream's timing", ["; ".join(reports[n].flags)
                                                                               for n in names])
    cams = [n for n in names if aligned[n].frames is not None]
    if cams:  # camera frame / strobe reconciliation, one row per stream (-1 / NaN: not a camera)
        for k, v in aligned[cams[0]].frames.items():
            empty = np.nan if isinstance(v, float) else -1
            cols[f"camera_{k}"] = (f"camera frames vs strobe edges: {k.replace('_', ' ')} ({empty}: not a camera)",
                                   np.array([aligned[n].frames[k] if n in cams else empty for n in names]))
    # The timebase rides on the reference's row rather than in a one-row table of its own; its wall clock at zero
    # is the file's session_start_time.
    cols["rate"] = ("nominal rate of the stream's sample counter (Hz)", np.array([streams[n].rate for n in names]))
    cols["zero_sample"] = ("the reference stream (source 'reference'): its sample at session time 0, so session time "
                           "= (sample - zero_sample) / rate; -1 on the other streams, timed by their fit",
                           np.array([zero_sample if n == ref.name else -1 for n in names], dtype=np.int64))
    return [TablePlan("clock_fits", "each stream's map from its sample counter to the reference clock, and its "
                          "quality (acqd.finalize.clock; docs/clock-alignment.md)", cols)]


def _notes(ref: Stream, zero_sample: int, session: dict) -> str:
    text = (f"Written by acqd finalize. Timebase: the clock of stream {ref.name!r}; session time 0 is its sample "
            f"{zero_sample}. Data are HDF5 external links into streams/ (read with NWBHDF5IO(path, 'r'), never 'a'); "
            "each series' sync group links the raw sync record. Clock fits: /processing/sync.")
    if session.get("incomplete"):
        text += " The session is marked INCOMPLETE (see session.json incidents)."
    return text


def _parse_time(text: str) -> datetime:
    """A session.json time; one without a zone is UTC."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
