"""The unmodified Open Ephys python client (open-ephys-python-tools, from PyPI) driving a real acqd daemon."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from open_ephys.control import OpenEphysHTTPServer

from acqd.service.procs import Simulator, wait_until
from acqd.session import read_annotations
from tests.sessions import SUBJECT


@pytest.mark.e2e
def test_open_ephys_client_drives_acqd(small_rig_file, daemon_factory, tmp_path):
    daemon = daemon_factory(small_rig_file)
    gui = OpenEphysHTTPServer()
    assert gui.address == "http://127.0.0.1:37497"  # its fixed port; acqd serve --port 37497 matches it
    gui.address = daemon.url  # the test daemon listens on a free port instead
    assert gui.status() == "IDLE"

    names = [p["name"] for p in gui.get_processors()]
    assert names == ["probe", "nidaq", "camera", "sensor"]
    assert gui.get_processors("nidaq")[0]["id"] == 101 and gui.get_processor_list()
    params = {p["name"]: p["value"] for p in gui.get_parameters(100)["parameters"]}
    assert params["rate"] == 30000.0 and params["dtype"] == "<i2"
    assert gui.get_parameters(100, 0)["name"] == "probe"
    assert "read-only" in gui.set_processor_parameter(100, "rate", 1.0)["error"]
    assert gui.get_config()["config"]["reference"] == "nidaq"
    assert 0.0 <= gui.get_cpu_usage()["usage"]

    info = gui.get_recording_info()
    assert info["parent_directory"] == str((tmp_path / "data").resolve())
    assert gui.get_recording_info("parent_directory") == info["parent_directory"]
    gui.set_prepend_text("m1_")
    gui.set_base_text("day3")
    gui.set_append_text("_a")
    assert gui.set_start_new_dir()["base_text"] == "day3"  # accepted: every acqd recording is a new folder
    assert gui.set_parent_dir(str(tmp_path / "data" / "rigA"))["parent_directory"] == str(
        (tmp_path / "data" / "rigA").resolve())
    refused = gui.set_parent_dir("/etc")["error"]
    assert "outside the allowed folders" in refused and "daemon.control.data_roots" in refused  # what to do about it

    assert gui.message("before acquiring")["mode"] == "IDLE"  # kept in the data root, as in ACQUIRE
    assert gui.acquire() == "ACQUIRE"
    note = gui.message("baseline")  # in ACQUIRE: kept in the data root, no session yet
    assert note["session"] is None and note["text"] == "baseline"
    sim = Simulator(small_rig_file, 60, seed=6)
    try:
        wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
        # The rig config holds no subject: a RECORD that brings none is refused, naming it, with Open Ephys' reply
        # shape. The operator prepares the animal for the script's next start (acqd record --prepare ...).
        refused = httpx.put(f"{daemon.url}/api/status", json={"mode": "RECORD"}, timeout=30)
        assert refused.status_code == 422 and refused.json()["error"].startswith("subject: missing"), refused.text
        assert refused.json()["mode"] == "ACQUIRE" and gui.status() == "ACQUIRE"
        assert daemon.command("recording", metadata={"subject": SUBJECT})["metadata"]["subject"] == SUBJECT
        assert gui.record() == "RECORD"
        note = gui.message("drug on")
        assert note["session"] == "m1_day3_a" and note["reference"] == "nidaq" and note["reference_sample"] > 0
        assert gui.record() == "RECORD"  # RECORD again keeps the session (idempotent)
        assert gui.acquire() == "ACQUIRE"  # Open Ephys: ACQUIRE while recording ends the recording
    finally:
        sim.stop()
    folder = tmp_path / "data" / "rigA" / "m1_day3_a"
    assert [a["text"] for a in read_annotations(folder)] == ["drug on"]
    assert [a["text"] for a in read_annotations(tmp_path / "data" / "rigA")] == ["before acquiring", "baseline"]
    assert json.loads((folder / "session.json").read_text())["state"] == "closed"

    for refused in (gui.get_latencies(), gui.load("/x.xml"), gui.save("/x.xml"), gui.undo(), gui.redo(),
                    gui.clear_signal_chain(), gui.delete_processor(100), gui.get_audio_settings(),
                    gui.set_sample_rate(30000), gui.quit()):
        assert isinstance(refused, dict) and refused["error"], refused
    assert "enable_quit" in gui.quit()["error"]
    assert gui.idle() == "IDLE"
    assert Path(info["parent_directory"]).is_dir()
