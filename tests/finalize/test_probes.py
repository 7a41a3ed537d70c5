"""Probe layouts into the NWB electrodes table after a real finalize: probeinterface JSON, SpikeGLX .meta; areas
checked against the Allen CCF ontology nwbinspector uses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import probeinterface as pi
import pytest
from pydantic import ValidationError
from pynwb import NWBHDF5IO

from acqd.config import ProbeConfig
from acqd.metadata import SessionMetadata
from acqd.finalize import finalize_session, unseal_session
from acqd.sim.simulate import Rig, SimParams
from sessions import Recording, record_session, small_config

CHANNELS = 8


def spikeglx_meta(path: Path) -> Path:
    """A Neuropixels 1.0 .ap.meta as SpikeGLX writes it: 384-entry imro table, 8 channels + SY0 saved."""
    imro = "(0,384)" + "".join(f"({c} 0 1 500 250 1)" for c in range(384))
    geom = "(PRB_1_4_0480_1,1,0,70)" + "".join(f"(0:{[27, 59, 11, 43][c % 4]}:{(c // 2) * 20}:1)" for c in range(384))
    chan_map = "(384,384,1)" + "".join(f"(AP{c};{c}:{c})" for c in range(CHANNELS)) + "(SY0;384:384)"
    path.write_text("\n".join(["imDatPrb_pn=PRB_1_4_0480_1", "imDatPrb_sn=18194814141", "imDatPrb_type=0",
                               f"nSavedChans={CHANNELS + 1}", "snsApLfSy=384,0,1", f"snsSaveChanSubset=0:{CHANNELS - 1},384",
                               "imSampRate=30000", f"~imroTbl={imro}", f"~snsChanMap={chan_map}",
                               f"~snsGeomMap={geom}"]) + "\n")
    return path


def finalize_with(tmp_path: Path, probe: ProbeConfig | None, ecephys: dict):
    cfg = small_config(tmp_path / "data", probe_channels=CHANNELS)
    streams = tuple(s.model_copy(update={"probe": probe}) if s.name == "probe" else s for s in cfg.streams)
    cfg = cfg.model_copy(update={"streams": streams, "metadata": {**cfg.metadata, "ecephys": ecephys}})
    folder = record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=10)), "P1", Recording(seconds=2.0))
    try:
        report = finalize_session(folder)
        violations = [m for m in report.check["inspector"] if m["importance"] in ("CRITICAL",
                                                                                  "BEST_PRACTICE_VIOLATION")]
        assert violations == []  # every row, the sync word's too, has an Allen CCF location
        with NWBHDF5IO(str(folder / report.master), "r") as io:
            nwbfile = io.read()
            table = nwbfile.electrodes.to_dataframe()
            device = nwbfile.devices["probe"]
            return table, (device.serial_number, device.model and device.model.manufacturer,
                           device.model and device.model.model_number)
    finally:
        unseal_session(folder)


def test_a_probeinterface_json_gives_positions_shanks_and_wiring(tmp_path):
    probe = pi.generate_multi_shank(num_shank=2, num_columns=2, num_contact_per_column=2, xpitch=16, ypitch=20)
    wiring = np.array([7, 6, 5, 4, 3, 2, 1, 0])  # contact k is recorded in column 7 - k
    probe.set_device_channel_indices(wiring)
    pi.write_probeinterface(tmp_path / "probe.json", probe)
    cfg = ProbeConfig(file=tmp_path / "probe.json", manufacturer="Cambridge NeuroTech", model="H2", serial="X1",
                      reference="tip")
    table, device = finalize_with(tmp_path, cfg, {"probe": {"location": "CA1"}})
    ephys = table[table.is_electrode]
    for k, col in enumerate(wiring):
        row = ephys.iloc[col]
        assert (row.rel_x, row.rel_y) == tuple(probe.contact_positions[k])
        assert row.shank == probe.shank_ids[k] and row.group_name == f"probe_shank{probe.shank_ids[k]}"
    assert set(ephys.location) == {"CA1"} and set(ephys.reference) == {"tip"}
    sync = table[~table.is_electrode]
    assert len(sync) == 1 and math.isnan(sync.rel_x.iloc[0]) and sync.group_name.iloc[0] == "probe_sync"
    assert device == ("X1", "Cambridge NeuroTech", "H2")


def test_a_spikeglx_meta_gives_neuropixels_positions_without_the_sync_channel(tmp_path):
    cfg = ProbeConfig(file=spikeglx_meta(tmp_path / "run_g0_t0.imec0.ap.meta"))
    areas = ["VISp"] * 4 + ["CA1"] * 4
    table, device = finalize_with(tmp_path, cfg, {"probe": {"location": "VISp", "channel_locations": areas}})
    ephys = table[table.is_electrode]
    # NP1.0 checkerboard: 2 columns per row, 20 um rows, 16 um stagger (probeinterface's origin)
    assert list(zip(ephys.rel_x, ephys.rel_y)) == [(16, 0), (48, 0), (0, 20), (32, 20), (16, 40), (48, 40),
                                                   (0, 60), (32, 60)]
    assert list(ephys.contact_id) == [f"e{k}" for k in range(CHANNELS)] and list(ephys.location) == areas
    assert device == ("18194814141", "imec", "PRB_1_4_0480_1")


def test_without_a_layout_the_table_says_so(tmp_path):
    table, _ = finalize_with(tmp_path, None, {"probe": {"location": "VISp"}})
    assert "rel_x" not in table.columns and set(table.location) == {"VISp"}
    assert "no probe layout was configured" in table.group.iloc[0].description


def test_an_area_outside_the_allen_ccf_is_refused_naming_it():
    meta = {"session_description": "s", "subject": {"subject_id": "m", "species": "Mus musculus", "sex": "F",
                                                    "age": "P90D"}}
    SessionMetadata.model_validate({**meta, "ecephys": {"probe": {"location": "VISp"}}})
    with pytest.raises(ValidationError, match="'V1x' not in the Allen Mouse Brain CCF"):
        SessionMetadata.model_validate({**meta, "ecephys": {"probe": {"location": "VISp",
                                                                      "channel_locations": ["CA1", "V1x"]}}})


def test_a_layout_that_does_not_fit_the_stream_is_refused_when_the_config_loads(tmp_path):
    import yaml

    from acqd.config import load_config
    from acqd.errors import ConfigError
    from conftest import write_rig

    pi.write_probeinterface(tmp_path / "small.json", pi.generate_linear_probe(num_elec=16))
    rig = write_rig(tmp_path, stream_overrides={"probe": {"probe": {"file": "small.json"}}})
    assert yaml.safe_load(rig.read_text())["streams"][0]["probe"]["file"].endswith("small.json")
    with pytest.raises(ConfigError, match="stream 'probe': probe file .*small.json: the probe layout has 16 contacts"):
        load_config(rig)
