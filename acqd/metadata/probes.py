"""Probe layouts and brain areas: a probe file read with probeinterface, and the Allen CCF terms acqd accepts.

This module owns turning a probe file (probeinterface JSON, SpikeGLX ``.meta``, Open Ephys ``settings.xml``) into
a ``ProbeLayout`` of plain tuples (contact positions in micrometres, shank, the stream column each contact is
recorded in), and the check of brain-area names against the Allen Mouse Brain CCF ontology that nwbinspector
ships (its own list is reused, never copied, so acqd refuses exactly what the DANDI inspection flags).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("probeinterface", "spikeglx", "openephys")


@dataclass(frozen=True, slots=True)
class ProbeLayout:
    """Every contact of a probe file: position (um), shank, and the stream column it is recorded in (-1: unwired)."""

    contact_ids: tuple[str, ...]
    x: tuple[float, ...]
    y: tuple[float, ...]
    z: tuple[float, ...] | None
    shanks: tuple[str, ...]
    columns: tuple[int, ...] | None
    """probeinterface's device_channel_indices; None when the file does not wire the contacts."""
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None


def detect_format(path: Path) -> str:
    """The file's format from its name: ``*.meta`` SpikeGLX, ``*.xml`` Open Ephys settings, else probeinterface."""
    suffix = path.suffix.lower()
    return "spikeglx" if suffix == ".meta" else "openephys" if suffix == ".xml" else "probeinterface"


def read_layout(path: Path, fmt: str = "auto") -> ProbeLayout:
    """Read ``path`` with probeinterface. SpikeGLX: the imro table's electrodes, cut to the saved channels, without
    the SY0 sync channel (not an electrode); contact k is then recorded in column k. A ProbeGroup of several probes
    (e.g. tetrodes) is one layout whose shanks are named ``<probe>.<shank>``."""
    import probeinterface as pi

    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "spikeglx":
        probes = [pi.read_spikeglx(path)]
    elif fmt == "openephys":
        probes = [pi.read_openephys_neuropixels(path)]
    else:
        probes = pi.read_probeinterface(path).probes
    if not probes:
        raise ValueError(f"{path}: holds no probe")
    pos = np.concatenate([p.contact_positions for p in probes])
    many = len(probes) > 1
    shanks = [f"{i}.{s or 0}" if many else str(s or 0) for i, p in enumerate(probes) for s in (p.shank_ids if p.shank_ids is not None else [""] * p.get_contact_count())]
    wired = all(p.device_channel_indices is not None for p in probes)
    first = probes[0]
    ann = first.annotations
    return ProbeLayout(
        contact_ids=tuple(str(c) for p in probes for c in p.contact_ids),
        x=tuple(float(v) for v in pos[:, 0]), y=tuple(float(v) for v in pos[:, 1]),
        z=tuple(float(v) for v in pos[:, 2]) if pos.shape[1] == 3 else None, shanks=tuple(shanks),
        columns=tuple(int(c) for p in probes for c in p.device_channel_indices) if wired else None,
        manufacturer=first.manufacturer or None, model=first.model_name or ann.get("part_number") or None,
        serial=first.serial_number or ann.get("serial_number") or None)


def contact_columns(layout: ProbeLayout, electrode_columns: list[int]) -> dict[int, int]:
    """Stream column -> contact index. Wired contacts (device_channel_indices >= 0) sit in the column they name;
    unwired files map contact i to the i-th electrode column. Every electrode column must get exactly one contact;
    a contact in a sync column, twice in one column or past the stream's columns is an error."""
    if layout.columns is None:
        if len(layout.contact_ids) != len(electrode_columns):
            raise ValueError(f"the probe layout has {len(layout.contact_ids)} contacts (not wired to channels) and "
                             f"the stream {len(electrode_columns)} electrode channels")
        return {col: i for i, col in enumerate(electrode_columns)}
    out: dict[int, int] = {}
    for i, col in enumerate(layout.columns):
        if col < 0:
            continue
        if col not in electrode_columns:
            raise ValueError(f"contact {layout.contact_ids[i]} is wired to channel {col}, which is not an electrode "
                             f"channel of the stream (channels {electrode_columns[0]}..{electrode_columns[-1]} less "
                             "the sync word)")
        if col in out:
            raise ValueError(f"contacts {layout.contact_ids[out[col]]} and {layout.contact_ids[i]} are both wired to "
                             f"channel {col}")
        out[col] = i
    missing = [c for c in electrode_columns if c not in out]
    if missing:
        raise ValueError(f"the probe layout wires no contact to channel(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return out


def allen_ccf_terms() -> frozenset[str]:
    """The Allen Mouse Brain CCF acronyms and names nwbinspector's check_electrodes_location_allen_ccf accepts."""
    _nwbinspector()
    from nwbinspector._internal_configs._allen_ccf import get_allen_ccf_location_terms

    return get_allen_ccf_location_terms()


def is_mouse(species: str) -> bool:
    """nwbinspector applies the Allen CCF check only to these species values."""
    _nwbinspector()
    from nwbinspector.checks._common import MOUSE_SPECIES_VALUES

    return species in MOUSE_SPECIES_VALUES


def _nwbinspector() -> None:
    """Import the package itself before one of its submodules. The daemon imports nwbinspector on a thread of its
    own at ACQUIRE (acqd.service.preload); a submodule imported meanwhile on another thread (a console metadata
    check) did not wait for the package's own import and deadlocked with it: the preload failed, and the check
    answered 500 (KeyError: 'nwbinspector'). Importing the package waits for it."""
    importlib.import_module("nwbinspector")


def unknown_areas(locations: list[str]) -> list[str]:
    """The locations that are no Allen CCF acronym or name, each once, in order."""
    terms = allen_ccf_terms()
    return list(dict.fromkeys(loc for loc in locations if loc not in terms))
