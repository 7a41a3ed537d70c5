"""Analysis files beside a sealed session (acqd.share.analysis): real h5py, pynwb, hdmf, no mocks.

One session is recorded and finalized (sealed) per module under ``<root>/data/S1``, with a sensor whose writer
was killed with -9, so its data reach the analysis file through two links and a virtual dataset. Analysis files go
to ``<root>/analysis/S1/``: beside the data root's sessions, so that moving ``<root>`` moves both. Sealed folders
are unsealed at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hdmf.backends.warnings import BrokenLinkWarning
from pynwb import NWBHDF5IO, TimeSeries, validate

from acqd.share.analysis import AnalysisError, external_links, new_analysis, open_analysis
from acqd.finalize import finalize_session, unseal_session, verify_manifest
from acqd.sim.simulate import Rig, SimParams
from sessions import Recording, Restart, record_session, small_config

SID = "S1"
RECORDING = Recording(seconds=10.0, restart=Restart("sensor", 6.0, crash=True))


pytestmark = pytest.mark.xdist_group("analysis")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``<root>/data/S1``, recorded and finalized; one raw-recorded copy ``<root>/raw/S1`` never finalized."""
    root = tmp_path_factory.mktemp("lab")
    cfg = small_config(root / "raw")
    folder = record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=30)), SID, RECORDING)
    shutil.copytree(folder, root / "data" / SID)
    try:
        finalize_session(root / "data" / SID)
        yield root
    finally:
        unseal_session(root / "data" / SID)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _master_data(root: Path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenLinkWarning)
        with NWBHDF5IO(str(root / "data" / SID / f"{SID}.nwb"), "r") as io:
            return {name: ts.data[:] for name, ts in io.read().acquisition.items()}


@pytest.fixture(scope="module")
def analysis(root):
    """An analysis file made the documented way: a processing module computed from the raw data, and scratch."""
    session = root / "data" / SID
    before = _snapshot(session)
    path = root / "analysis" / SID / "rms.nwb"
    with new_analysis(session, path) as nwb:
        probe = nwb.acquisition["probe"]
        rms = np.sqrt(np.mean(probe.data[:30000, :32].astype(np.float64) ** 2, axis=0))
        module = nwb.create_processing_module(name="ecephys", description="per-channel RMS of the first second")
        module.add(TimeSeries(name="rms", data=rms, unit="volts", conversion=probe.conversion, rate=1.0,
                              description="RMS of each electrode over the first second"))
        nwb.add_scratch(np.array([4.5, 5.0]), name="thresholds", description="thresholds tried, in RMS units")
    return path, rms, before


def test_the_analysis_file_links_the_raw_data_and_holds_processing_and_scratch(root, analysis):
    path, rms, _ = analysis
    master = root / "data" / SID / f"{SID}.nwb"
    with h5py.File(path, "r") as f:
        for name in ("probe", "nidaq", "camera", "sensor"):
            link = f["acquisition"].get(name, getlink=True)
            assert isinstance(link, h5py.ExternalLink) and not os.path.isabs(link.filename), name
            assert link.filename == "../../data/S1/S1.nwb" and link.path == f"/acquisition/{name}"
        sizes = []
        f.visititems(lambda _, o: sizes.append(o.nbytes) if isinstance(o, h5py.Dataset) else None)
    assert sum(sizes) < 100_000 < master.stat().st_size  # raw data linked, never copied
    assert path.stat().st_size < 1_000_000 and not list(path.parent.glob(".*partial*"))
    links = external_links(path)
    assert links and all(link.resolved for link in links)
    assert {link.file for link in links} >= {"../../data/S1/S1.nwb", "streams/probe.h5", "vds/sensor.h5",
                                             "../streams/sensor.part001.h5", "../recovered/sensor.h5"}
    raw = _master_data(root)
    with open_analysis(path) as nwb:
        assert np.array_equal(nwb.processing["ecephys"]["rms"].data[:], rms)
        assert np.array_equal(nwb.scratch["thresholds"].data[:], [4.5, 5.0])
        assert nwb.scratch["thresholds"].description == "thresholds tried, in RMS units"
        for name, data in raw.items():
            assert np.array_equal(nwb.acquisition[name].data[:], data), name
        assert len(nwb.acquisition["sensor"].data) > 0 and nwb.identifier != SID
    assert validate(path=str(path)) == []


def test_the_sealed_session_is_unchanged(root, analysis):
    _, _, before = analysis
    session = root / "data" / SID
    assert _snapshot(session) == before
    assert verify_manifest(session) == []


def test_it_reads_back_after_moving_the_session_together_with_it(root, analysis, tmp_path, monkeypatch):
    path, rms, _ = analysis
    raw = _master_data(root)
    moved = tmp_path / "elsewhere" / "lab"
    moved.parent.mkdir()
    os.rename(root, moved)
    try:
        monkeypatch.chdir(tmp_path)  # links resolve against their files' folders, not the working directory
        moved_path = moved / path.relative_to(root)
        assert all(link.resolved for link in external_links(moved_path))
        with open_analysis(moved_path) as nwb:
            assert np.array_equal(nwb.processing["ecephys"]["rms"].data[:], rms)
            for name, data in raw.items():
                assert np.array_equal(nwb.acquisition[name].data[:], data), name
    finally:
        os.rename(moved, root)


def test_a_broken_link_is_an_error_never_empty_data(root, analysis, tmp_path):
    path, _, _ = analysis
    alone = tmp_path / "alone" / path.name  # the analysis file without its session
    alone.parent.mkdir()
    shutil.copy(path, alone)
    with pytest.raises(AnalysisError, match=r"do not resolve.*/acquisition/probe -> \.\./\.\./data/S1/S1\.nwb"):
        with open_analysis(alone):
            pass
    # Session and analysis copied together, then a stream file and a part behind the virtual dataset lost:
    # plain pynwb would read them as empty data (or the VDS as fill values).
    copy = tmp_path / "copy"
    shutil.copytree(root / "data", copy / "data")
    shutil.copytree(root / "analysis", copy / "analysis")
    try:
        unseal_session(copy / "data" / SID)
        (copy / "data" / SID / "streams" / "probe.h5").unlink()
        (copy / "data" / SID / "streams" / "sensor.part001.h5").unlink()
        broken = {(link.where, link.file) for link in external_links(copy / path.relative_to(root))
                  if not link.resolved}
        assert broken == {("/acquisition/probe/data", "streams/probe.h5"),
                          ("/acquisition/probe/sync", "streams/probe.h5"),
                          ("/acquisition/sensor/data", "../streams/sensor.part001.h5"),
                          ("/acquisition/sensor/sync/clock", "../streams/sensor.part001.h5"),
                          ("/acquisition/sensor/sync/edges", "../streams/sensor.part001.h5")}
        with pytest.raises(AnalysisError, match="5 link"):
            with open_analysis(copy / path.relative_to(root)):
                pass
    finally:
        unseal_session(copy / "data" / SID)


def test_refusals_write_nothing(root, analysis, tmp_path):
    path, _, _ = analysis
    session = root / "data" / SID
    before = _snapshot(session)
    with pytest.raises(AnalysisError, match="inside the sealed session.*manifest"):
        with new_analysis(session, session / "analysis" / "x.nwb"):
            pass
    with pytest.raises(AnalysisError, match="already exists"):
        with new_analysis(session, path):
            pass
    with pytest.raises(AnalysisError, match="not finalized"):
        with new_analysis(root / "raw" / SID, tmp_path / "raw.nwb"):
            pass
    with pytest.raises(AnalysisError, match="must end in .nwb"):
        with new_analysis(session, tmp_path / "x.h5"):
            pass
    target = tmp_path / "failed" / "x.nwb"
    with pytest.raises(ZeroDivisionError):
        with new_analysis(session, target) as nwb:
            nwb.add_scratch(np.arange(3), name="partial", description="never written")
            1 / 0
    assert list(target.parent.iterdir()) == []  # nothing, not even a partial file
    assert _snapshot(session) == before and verify_manifest(session) == []


def test_the_documented_example_runs(root, tmp_path):
    """docs/analysis.md's example, with its two paths pointed at this module's session."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "analysis.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    code, n = re.subn(r"^(session|path) = .*$", "", code, flags=re.M)
    assert n == 2
    namespace = {"__name__": "docs_example"}
    exec(compile("from pathlib import Path\n"  # noqa: S102 - our own documentation
                 f"session = Path({str(root / 'data' / SID)!r})\n"
                 f"path = Path({str(tmp_path / 'analysis' / 'rms.nwb')!r})\n" + code, "docs/analysis.md", "exec"),
         namespace)
    assert (tmp_path / "analysis" / "rms.nwb").is_file() and namespace["first_second"].shape[0] == 30000
