"""Annotations: durable when the call returns, placed on the reference timebase, kept by finalize and export."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from pynwb import NWBHDF5IO

from acqd.finalize import unseal_session
from acqd.service.annotations import reference_sample
from acqd.service.procs import wait_until
from acqd.session import read_annotations
from tests import zygote
from tests.conftest import recording


def test_reference_sample_extrapolates_from_the_last_chunk_at_the_nominal_rate():
    assert reference_sample([1000, 5_000_000_000, 0], 30000.0, 5_010_000_000) == 1300
    assert reference_sample(None, 30000.0, 1) is None


def _job(daemon, kind: str, session: str) -> dict:
    return wait_until(lambda: (j := daemon.command(f"{kind}_status", session=session))["state"] != "running" and j,
                      f"the {kind}", 300, every_s=0.25)


@pytest.mark.e2e
def test_annotation_survives_kill9_and_reaches_the_finalized_and_exported_nwb(small_rig_file, daemon_factory, tmp_path):
    rig_file = small_rig_file
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "notes", seed=61) as (_, folder):
        wait_until(lambda: daemon.command("status")["streams"]["nidaq"]["rows"] > 30000, "1 s of data")
        cli = zygote.run([sys.executable, "-m", "acqd.cli", "annotate", "drug on", "--json"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "ACQD_URL": daemon.url})
        assert cli.returncode == 0, cli.stderr
        first = json.loads(cli.stdout)
        # The Open Ephys client's request: PUT with a JSON body and no Content-Type.
        r = httpx.put(daemon.url + "/api/message", content=json.dumps({"text": "animal moved"}), timeout=30)
        assert r.status_code == 200
        os.kill(daemon.pid, signal.SIGKILL)  # right after the reply: nothing may still be in flight
        daemon.proc.wait(30)
    notes = read_annotations(folder)
    assert [n["text"] for n in notes] == ["drug on", "animal moved"]
    assert notes[0]["reference"] == "nidaq" and notes[0]["reference_sample"] == first["reference_sample"] > 30000
    assert notes[1]["reference_sample"] > notes[0]["reference_sample"]

    daemon = daemon_factory(rig_file)  # the restarted daemon finds the session interrupted
    assert daemon.command("status")["recovered"][0]["session_id"] == "notes"
    try:
        daemon.command("finalize", session="notes")
        job = _job(daemon, "finalize", "notes")
        assert job["state"] == "done", job["error"]
        rate = 30000.0
        with NWBHDF5IO(str(folder / "notes.nwb"), "r") as io:
            table = io.read().events["annotations"]
            assert list(table["text"][:]) == ["drug on", "animal moved"]
            assert list(table["reference_sample"][:]) == [n["reference_sample"] for n in notes]
            t = table["timestamp"][:]
            zero = (notes[0]["reference_sample"] - t[0] * rate)  # one timebase: sample = zero + t * rate
            assert abs((notes[1]["reference_sample"] - zero) / rate - t[1]) < 1e-6 and 0 < t[0] < t[1] < 60
        daemon.command("export", session="notes", out=str(tmp_path / "share"))
        exported = _job(daemon, "export", "notes")
        assert exported["state"] == "done", exported["error"]
        (nwb_file,) = (tmp_path / "share").rglob("*.nwb")
        with NWBHDF5IO(str(nwb_file), "r") as io:
            table = io.read().events["annotations"]
            assert list(table["text"][:]) == ["drug on", "animal moved"] and list(table["timestamp"][:]) == list(t)
    finally:
        unseal_session(Path(folder))
