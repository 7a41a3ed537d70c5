"""The open session's record (unit): parts and incidents reach session.json, routine incidents at most once a
second, a capped incident list, and a part closed after its session closed."""

from __future__ import annotations

import json
import time

import pytest

from acqd.config import StreamConfig, load_config
from acqd.errors import SessionError
from acqd.finalize.streams import stream_parts
from acqd.record.streamfile import StreamFile, part_filename
from acqd.service.procs import wait_until
from acqd.service.sessionrecord import (MAX_INCIDENTS, PART_SAVE_S, SessionRecord, record_late_close,
                                        recover_interrupted, session_metadata)
from acqd.session import CLOSED
from tests.conftest import write_rig

META = {"session_description": "unit", "subject": {"subject_id": "m1", "species": "Mus musculus", "sex": "F",
                                                   "age": "P90D"}}


@pytest.fixture
def record(tmp_path):
    cfg = load_config(write_rig(tmp_path))
    (tmp_path / "data").mkdir(exist_ok=True)
    return SessionRecord.create(tmp_path / "data", "s1", cfg, session_metadata(cfg, META))


def _saved(record: SessionRecord) -> dict:
    return json.loads((record.folder / "session.json").read_text())


def _flushed(record: SessionRecord) -> dict:
    """session.json once the parts waiting in ``record`` are due and the supervisor's round has flushed them."""
    wait_until(lambda: (record.flush(), record.due == float("inf"))[1], "the parts to be written", 5, 0.02)
    return _saved(record)


def test_parts_reach_session_json_within_part_save_s(record):
    path = str(record.streams_dir / "probe.h5")
    t = time.monotonic()
    record.add_part("probe", 0, path)
    assert _flushed(record)["streams"]["probe"]["parts"] == [{"part": 0, "path": "streams/probe.h5", "rows": None}]
    assert time.monotonic() - t < PART_SAVE_S + 1.0
    record.close_part("probe", {"path": path, "rows": 10, "counts": {"gaps": 0}, "suspect": "torn"})
    assert _flushed(record)["streams"]["probe"]["parts"] == [{"part": 0, "path": "streams/probe.h5", "rows": 10,
                                                              "counts": {"gaps": 0}, "suspect": "torn"}]


def test_parts_of_many_streams_rolling_over_together_cost_one_write(record, monkeypatch):
    """A hundred slow streams close a part and open the next within a round: one write of session.json, not one per
    part (each rewrote the whole record: the supervisor's largest cost at 96 slow streams with 10 s parts)."""
    writes = []
    monkeypatch.setattr("acqd.service.sessionrecord.write_session", lambda f, d: writes.append(f) or True)
    streams = list(record.data["streams"])
    for name in streams:
        record.add_part(name, 0, str(record.streams_dir / f"{name}.h5"))
    for name in streams:
        record.close_part(name, {"path": str(record.streams_dir / f"{name}.h5"), "rows": 5, "counts": {}})
        record.add_part(name, 1, str(record.streams_dir / f"{name}.part001.h5"))
    record.flush()  # a round right after: not due yet
    assert writes == []
    record.due -= PART_SAVE_S  # the round PART_SAVE_S later
    record.flush()
    assert len(writes) == 1 and all(len(record.parts(n)) == 2 for n in streams)


def test_a_part_the_daemon_died_before_writing_down_is_still_one_of_the_session(record):
    """A part reported by its writer reaches session.json only at the next round (``PART_SAVE_S``): a daemon killed
    in between leaves it unlisted. Finalize takes it all the same (``stream_parts``: the listed parts and the stream's
    part files on disk), as the recovery of the interrupted session lists it among the files it checked."""
    name = next(iter(record.data["streams"]))
    paths = [record.streams_dir / part_filename(name, n) for n in (0, 1)]
    cfg = StreamConfig.model_validate(record.data["config"]["streams"][0])
    for n, path in enumerate(paths):
        StreamFile.create(path, cfg, session={"session_id": "s1"}, lines=[], part=n).close()
        record.add_part(name, n, str(path))
        if n == 0:
            _flushed(record)
    # killed here: part 1 reported, not yet written down
    saved = _saved(record)
    assert [p["part"] for p in saved["streams"][name]["parts"]] == [0]
    assert stream_parts(record.folder, saved)[name] == paths
    assert part_filename(name, 1) in recover_interrupted(record.folder.parent)[0]["files"]


def test_routine_incidents_are_written_at_most_once_a_second(record):
    record.saved_at -= 1.0  # its creation was written a second ago
    record.add_incident("probe", "gap", "first", incomplete=False)
    record.add_incident("probe", "gap", "second", incomplete=False)  # within the second: kept, not yet written
    assert record.unsaved and [i["detail"] for i in _saved(record)["incidents"]] == ["first"]
    record.add_incident(None, "disk_full", "now", incomplete=True)  # what makes it incomplete is written at once
    saved = _saved(record)
    assert not record.unsaved and saved["incomplete"] and len(saved["incidents"]) == 3


def test_incidents_are_capped_and_the_rest_counted(record):
    for i in range(MAX_INCIDENTS + 5):
        record.add_incident("probe", "gap", str(i), incomplete=False)
    assert len(record.data["incidents"]) == MAX_INCIDENTS and record.data["incidents_omitted"] == 5


def test_a_part_closed_after_its_session_closed_gets_its_rows(record):
    path = str(record.streams_dir / "sensor.h5")
    record.add_part("sensor", 0, path)
    assert record.close(CLOSED, {"camera": "writer died"})
    saved = _saved(record)
    assert saved["state"] == CLOSED and saved["incomplete"] and saved["streams"]["camera"]["stopped_reason"]
    record_late_close("sensor", {"path": path, "rows": 7, "counts": {}})
    saved = _saved(record)
    assert saved["streams"]["sensor"]["parts"][0]["rows"] == 7 and saved["incidents"][-1]["kind"] == "late_close"


def test_metadata_that_dandi_refuses_is_refused(tmp_path):
    cfg = load_config(write_rig(tmp_path))
    with pytest.raises(SessionError, match="DANDI needs subject_id"):
        session_metadata(cfg, {"subject": {"subject_id": None}})
