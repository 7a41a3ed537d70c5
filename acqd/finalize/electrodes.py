"""An ephys stream's device and electrodes table rows: its probe layout (acqd.metadata.probes) joined with the session's
``metadata.ecephys`` (brain areas, device), for ``acqd.finalize.nwb`` to write.

Contact positions go in NWB's ``rel_x``/``rel_y`` (``rel_z`` for 3D layouts), in micrometres relative to the probe
(``x``/``y``/``z`` are brain coordinates, unknown to acqd). One electrode group per shank. A stream without a
layout says so in its group's description and gets no positions (NaN where another stream has them). The
digital sync word column keeps a row (the series links the stream's whole dataset, so every column needs one) in
its own group, with ``is_electrode`` False.
"""

from __future__ import annotations

import math

from acqd.config import ChannelSync, StreamConfig, electrode_columns
from acqd.errors import FinalizeError
from acqd.finalize.masterplan import ElectrodeRow, ElectrodesPlan
from acqd.metadata.probes import contact_columns, is_mouse, read_layout, unknown_areas

UNKNOWN = "unknown"


def electrodes_plan(cfg: StreamConfig, channels: tuple[str, ...], meta: dict, species: str | None
                    ) -> ElectrodesPlan:
    """The rows for every column of ``cfg``'s data, and the device, from the layout and ``meta`` (the stream's
    ``metadata.ecephys`` entry, may be empty). Raises ``FinalizeError`` for a layout or area that does not fit."""
    cols = electrode_columns(cfg)
    sync_col = cfg.sync.channel if isinstance(cfg.sync, ChannelSync) else None
    area = meta.get("location") or UNKNOWN
    per_channel = list(meta.get("channel_locations") or [])
    if per_channel and len(per_channel) not in (len(cols), cfg.shape[0]):
        raise FinalizeError(f"metadata.ecephys.{cfg.name}.channel_locations has {len(per_channel)} entries; the "
                            f"stream has {len(cols)} electrode channels")
    where = dict(zip(cols if len(per_channel) == len(cols) else range(cfg.shape[0]), per_channel))
    if species is not None:
        bad = unknown_areas([area, *per_channel]) if is_mouse(species) else []
        if [b for b in bad if b != UNKNOWN]:
            raise FinalizeError(f"metadata.ecephys.{cfg.name}: {', '.join(map(repr, bad))} not in the Allen Mouse "
                                "Brain CCF ontology")
    probe, layout, contact = cfg.probe, None, {}
    if probe is not None:
        try:
            layout = read_layout(probe.file, probe.format)
            contact = contact_columns(layout, cols)
        except Exception as e:  # noqa: BLE001 - any failure to read the layout stops finalize with its reason
            raise FinalizeError(f"stream {cfg.name!r}: probe file {probe.file}: {e}") from None
    device = meta.get("device") or {}
    described = meta.get("description") or (cfg.description or cfg.name)
    groups: dict[str, tuple[str, str]] = {}
    rows = []
    for c, name in enumerate(channels):
        if c == sync_col:
            group = f"{cfg.name}_sync"
            groups[group] = (f"digital sync word recorded as a column of {cfg.name}'s data: not an electrode "
                             "(its location is the probe's)", area)
            rows.append(ElectrodeRow(name, group, area, False))
            continue
        loc = where.get(c, area)
        if layout is None:
            group = cfg.name
            groups[group] = (f"{described}; no probe layout was configured: contact positions unknown", area)
            rows.append(ElectrodeRow(name, group, loc, True))
            continue
        k = contact[c]
        shank = layout.shanks[k]
        group = cfg.name if len(set(layout.shanks)) == 1 else f"{cfg.name}_shank{shank}"
        groups[group] = (f"{described}; shank {shank or 0} of the probe layout {probe.file.name}", area)
        rows.append(ElectrodeRow(name, group, loc, True, layout.x[k], layout.y[k],
                                     layout.z[k] if layout.z else math.nan, layout.contact_ids[k], shank,
                                     probe.reference or UNKNOWN))
    return ElectrodesPlan(
        device_name=device.get("name") or cfg.name, device_description=device.get("description") or cfg.description
        or cfg.name, manufacturer=device.get("manufacturer") or (probe and probe.manufacturer)
        or (layout and layout.manufacturer), model=(probe and probe.model) or (layout and layout.model),
        serial=(probe and probe.serial) or (layout and layout.serial), groups=groups, rows=rows,
        positions=layout is not None, three_d=bool(layout and layout.z))
