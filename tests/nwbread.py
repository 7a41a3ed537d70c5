"""Reading a finalized session back as an analyst would: the master NWB through plain pynwb (a broken link an
error, never empty data), a series' times, and a stream's committed rows from its part files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from hdmf.backends.warnings import BrokenLinkWarning
from pynwb import NWBHDF5IO

from acqd.record.streamfile import committed_rows, open_for_read


def stream_data(folder: Path, parts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(committed rows of /data, device sample of each row) of a stream's part files, in order."""
    data, samples = [], []
    for rel in parts:
        with open_for_read(folder / rel) as f:
            n = committed_rows(f)
            data.append(f["data"][:n])
            for r in f["index"][:]:
                samples.append(np.arange(r["first_sample"], r["first_sample"] + r["n_samples"], dtype=np.int64))
    return np.concatenate(data), np.concatenate(samples)


def series_times(ts) -> np.ndarray:
    if ts.timestamps is not None:
        return ts.timestamps[:]
    n = ts.num_samples if getattr(ts, "external_file", None) is not None else ts.data.shape[0]
    return ts.starting_time + np.arange(n) / ts.rate


def read_master(path: Path):
    """Open like an analyst, but with a broken link an error instead of silently empty data."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        io = NWBHDF5IO(str(path), "r")
        return io, io.read()
