"""Injected faults: each rejected or recorded, counted, nothing wrong written, the writer keeps going."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import pytest

from acqd.record.ingest import Gap, Reject
from acqd.service.procs import wait_until
from tests.conftest import assert_bit_exact, recording, rig_for, write_rig

PROBE_FAULTS = {  # seq -> (kind, what acqd must record)
    400: ("drop", Gap.SEQ), 420: ("duplicate", Reject.DUPLICATE), 440: ("reorder", Reject.LATE),
    460: ("malformed", Reject.MALFORMED), 480: ("oversized", Reject.OVERSIZED), 500: ("wrong_dtype", Reject.DTYPE),
    520: ("wrong_shape", Reject.SHAPE), 540: ("size_mismatch", Reject.MALFORMED),
    560: ("wrong_frames", Reject.MALFORMED),
}


@pytest.mark.e2e
def test_row13_injected_drops_duplicates_reorders_and_bad_messages_through_the_daemon(tmp_path: Path, daemon_factory):
    rig_file = write_rig(tmp_path, stream_overrides={"probe": {"max_message_bytes": 1 << 20}})
    faults = [f"probe:{kind}:{seq}" for seq, (kind, _) in PROBE_FAULTS.items()]
    faults += ["camera:drop:200", "nidaq:restart:500"]
    truth = tmp_path / "truth.json"
    daemon = daemon_factory(rig_file)
    with recording(daemon, rig_file, "faults", seed=5, faults=tuple(faults), truth=truth) as (status, folder):
        assert status["streams"]["probe"]["last_seq"] < 350, "recording must start before the first fault"
        wait_until(lambda: (daemon.command("status")["streams"]["probe"]["last_seq"] or 0) > 620
                   and (daemon.command("status")["streams"]["nidaq"]["last_seq"] or 0) > 50, "faults to pass", 30)
        live = daemon.command("status")["streams"]
        daemon.command("stop")
    daemon.command("stop", idle=True)

    assert live["probe"]["state"] == "recording" and live["probe"]["gaps"] == 2 and live["probe"]["rejected"] == 8
    assert live["probe"]["restarts"] == 0
    injected = {(f["stream"], f["seq"]): f for f in json.loads(truth.read_text())["faults"]}
    assert len(injected) == len(faults)
    cfg, rig = rig_for(rig_file, seed=5)
    for s in cfg.streams:
        with h5py.File(folder / "streams" / f"{s.name}.h5", "r") as f:
            assert assert_bit_exact(f, rig, s.name) == f["data"].shape[0]
    with h5py.File(folder / "streams" / "probe.h5", "r") as f:
        gaps = f["gaps"][:]
        expected = sorted((seq, seq + 1, injected[("probe", seq)]["sample_from"], injected[("probe", seq)]["sample_to"])
                          for seq, (kind, _) in PROBE_FAULTS.items() if kind in ("drop", "reorder"))
        assert sorted((int(g["seq_from"]), int(g["seq_to"]), int(g["sample_from"]), int(g["sample_to"]))
                      for g in gaps) == expected
        assert set(gaps["kind"].tolist()) == {Gap.SEQ}
        reasons = Counter(Reject(int(r)) for r in f["rejects"]["reason"])
        assert reasons == Counter(want for _, want in PROBE_FAULTS.values() if isinstance(want, Reject))
        # Nothing wrong was written: every seq in the index is unique and increasing.
        seqs = f["index"]["seq"][:].astype(int)
        assert all(b > a for a, b in zip(seqs, seqs[1:])) and 400 not in seqs and 440 not in seqs
    with h5py.File(folder / "streams" / "camera.h5", "r") as f:
        (gap,) = f["gaps"][:]
        drop = injected[("camera", 200)]
        assert (gap["kind"], gap["seq_from"], gap["sample_from"], gap["sample_to"]) == (
            Gap.SEQ, 200, drop["sample_from"], drop["sample_to"])
    with h5py.File(folder / "streams" / "nidaq.h5", "r") as f:
        (gap,) = f["gaps"][:]
        assert gap["kind"] == Gap.RESTART and gap["seq_from"] == 0
        assert gap["sample_from"] <= injected[("nidaq", 500)]["sample_from"] <= gap["sample_to"]
        assert len(set(f["index"]["epoch"][:].tolist())) == 2
    session = json.loads((folder / "session.json").read_text())
    kinds = Counter(i["kind"] for i in session["incidents"])
    assert kinds["gap"] == 4
