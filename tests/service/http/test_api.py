"""The control API against a real daemon: Open Ephys routes, refusals with reasons, tokens, the CLI."""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

from acqd.client import ApiError, Client
from tests import zygote
from tests.conftest import acquiring, write_rig
from tests.sessions import SUBJECT

SUBJECT_ARGS = ("--subject-id", SUBJECT["subject_id"], "--species", SUBJECT["species"], "--sex", SUBJECT["sex"],
                "--age", SUBJECT["age"])


def test_open_ephys_routes_and_refusals_without_drivers(rig_file, daemon_factory, tmp_path):
    daemon = daemon_factory(rig_file)
    c = daemon.client
    assert c.request("GET", "/api/status")["mode"] == "IDLE"
    assert c.request("PUT", "/api/status", {"mode": "ACQUIRE"})["mode"] == "ACQUIRE"
    streams = c.request("GET", "/api/streams")["streams"]
    assert set(streams) == {"probe", "nidaq", "camera", "sensor"}
    assert all(s["pid"] and not s["connected"] for s in streams.values())

    # No subject: RECORD is refused naming it (422); with one, but no driver publishing, it is refused with the
    # reason (409); nothing is created either way.
    with pytest.raises(ApiError, match="subject: missing") as e:
        c.request("PUT", "/api/status", {"mode": "RECORD"})
    assert e.value.status == 422
    with pytest.raises(ApiError, match="refusing to record: stream 'probe' is silent") as e:
        daemon.command("record", metadata={"subject": SUBJECT})
    assert e.value.status == 409
    assert not any(p.is_dir() for p in (tmp_path / "data").iterdir())

    rec = c.request("PUT", "/api/recording", {"prepend_text": "m1_", "base_text": "day3"})
    assert rec["parent_directory"] == str((tmp_path / "data").resolve()) and rec["prepend_text"] == "m1_"
    assert c.request("GET", "/api/recording")["base_text"] == "day3"

    with pytest.raises(ApiError, match="unknown mode|Input should be") as e:
        c.request("PUT", "/api/status", {"mode": "PLAY"})
    assert e.value.status == 422
    with pytest.raises(ApiError, match="no route") as e:
        c.request("GET", "/api/nothing")
    assert e.value.status == 404
    assert c.request("PUT", "/api/status", {"mode": "IDLE"})["mode"] == "IDLE"


@pytest.mark.e2e
def test_record_refuses_hostile_names_and_missing_metadata(small_rig_file, daemon_factory, tmp_path):
    daemon = daemon_factory(small_rig_file)
    with acquiring(daemon, small_rig_file, seed=2):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        for name in ("../x", "/abs", "", "a\u0000b", "a/b"):
            with pytest.raises(ApiError, match="invalid session name"):
                daemon.command("record", session=name)
        # Each field finalize's inspection would refuse is refused at RECORD, named with the nwbinspector check.
        for field, value, check in (("species", "mouse", "check_subject_species_form"),
                                    ("age", "90 days", "check_subject_age"), ("sex", "X", "check_subject_sex"),
                                    ("subject_id", "m/1", "check_subject_id_no_slashes"),
                                    ("weight", "25", "check_subject_weight")):
            r = httpx.post(f"{daemon.url}/api/commands/record", timeout=30,
                           json={"session": "badmeta", "metadata": {"subject": {**SUBJECT, field: value}}})
            assert r.status_code == 422, r.text
            assert f"subject.{field}: {value!r}: " in r.json()["error"] and f"({check})" in r.json()["error"]
            assert [(p["field"], p["check"]) for p in r.json()["problems"]] == [(f"subject.{field}", check)]
        out = zygote.run([sys.executable, "-m", "acqd.cli", "record", "--url", daemon.url, "--session", "cli",
                          *SUBJECT_ARGS, "--species", "mouse"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "subject.species: 'mouse': " in out.stderr, out.stderr
        assert "(check_subject_species_form)" in out.stderr
        with pytest.raises(ApiError, match="subject.sex"):
            daemon.command("record", session="nosex", metadata={"subject": {**SUBJECT, "sex": None}})
        with pytest.raises(ApiError, match=r"metadata.Subject.colour: unknown key"):
            daemon.command("record", session="unknown", metadata={"Subject": {"colour": "brown"}})
        # No subject: the rig config holds none, and RECORD names what is missing (API and CLI, one line).
        with pytest.raises(ApiError, match=r"^subject: missing: every recording needs its animal \(subject.subject_id"):
            daemon.command("record", session="nobody")
        with pytest.raises(ApiError, match=r"subject.species: Field required.*subject.sex: Field required"):
            daemon.command("record", session="half", metadata={"subject": {"subject_id": "M3"}})
        out = zygote.run([sys.executable, "-m", "acqd.cli", "record", "--url", daemon.url, "--session", "x"],
                         capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("acqd: error: subject: missing: every recording"), out
        assert len(out.stderr.strip().splitlines()) == 1 and "--subject-id" in out.stderr
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
        daemon.command("record", session="taken", metadata={"subject": SUBJECT})
        daemon.command("stop")
        with pytest.raises(ApiError, match="already exists"):
            daemon.command("record", session="taken", metadata={"subject": SUBJECT})
        assert daemon.command("status")["mode"] == "ACQUIRE"
        # BIDS entities name the folder (sub is the subject_id); neuroconv's layout is accepted as acqd's own.
        bids = "sub-M12_ses-3_task-gonogo_run-1"
        daemon.command("record", bids={"sub": "M12", "ses": "3", "task": "gonogo", "run": "1"},
                       metadata={"Subject": {"species": "Mus musculus", "sex": "M", "age": "P90D/P120D"}})
        with pytest.raises(ApiError, match="is being recorded") as e:
            daemon.command("amend", session=bids, metadata={"lab": "x"})
        assert e.value.status == 409
        daemon.command("stop")
        meta = json.loads((tmp_path / "data" / bids / "session.json").read_text())["metadata"]
        assert meta["bids"]["task"] == "gonogo" and meta["subject"]["subject_id"] == "M12"
        a = daemon.command("amend", session="taken", metadata={"Subject": {"weight": "25 g"}}, who="Doe, Jane")
        assert a["who"] == "Doe, Jane" and a["what"] == ["subject.weight: None -> '25 g'"]
        r = httpx.post(f"{daemon.url}/api/commands/amend", timeout=30,
                       json={"session": "taken", "metadata": {"subject": {"species": "mouse"}}})
        assert r.status_code == 422 and r.json()["problems"][0]["check"] == "check_subject_species_form"
    sessions = daemon.client.request("GET", "/api/sessions")["sessions"]
    assert [(s["session_id"], s["state"]) for s in sessions] == [(bids, "closed"), ("taken", "closed")]


def test_token_is_required_when_configured(tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"token": "s3cret"}}))
    with pytest.raises(ApiError) as e:
        daemon.client.request("GET", "/api/status")
    assert e.value.status == 401
    with pytest.raises(ApiError):
        Client(daemon.url, token="wrong").request("GET", "/api/status")
    assert Client(daemon.url, token="s3cret").request("GET", "/api/status")["mode"] == "IDLE"


def test_cli_client_uses_the_same_commands(rig_file, daemon_factory):
    daemon = daemon_factory(rig_file)
    env = {**os.environ, "ACQD_URL": daemon.url}
    run = lambda *a: zygote.run([sys.executable, "-m", "acqd.cli", *a], capture_output=True, text=True,
                                timeout=120, env=env)
    out = run("acquire", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["mode"] == "ACQUIRE"
    out = run("status")
    assert out.returncode == 0 and "ACQUIRE" in out.stdout and "probe" in out.stdout
    out = run("record", "--session", "x", *SUBJECT_ARGS)
    assert out.returncode == 2 and "silent" in out.stderr
    out = run("stop")
    assert out.returncode == 0 and daemon.command("status")["mode"] == "IDLE"


def test_second_daemon_on_the_same_data_root_is_refused(rig_file, daemon_factory, tmp_path):
    daemon_factory(rig_file)
    out = zygote.run([sys.executable, "-m", "acqd.cli", "serve", "--config", str(rig_file), "--data-root",
                      str(tmp_path / "data"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "another acqd is already serving" in out.stderr
