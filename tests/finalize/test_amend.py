"""Amending a recorded session's metadata: before finalize (session.json, which finalize reads) and after
(only the master is rewritten: sealed stream files byte-identical, manifest valid, previous master's digest kept)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from pynwb import validate

from acqd.finalize import finalize_session, is_immutable, unseal_session, verify_manifest
from acqd.finalize.amend import amend_session, check_metadata
from acqd.finalize.nwb import check_master
from acqd.errors import SessionError
from acqd.metadata import MetadataError
from acqd.session import SESSION_FILE, read_session, write_json_atomic
from acqd.sim.simulate import Rig, SimParams
from tests import zygote
from sessions import Recording, record_session, small_config

TIMEOUT_S = 120
LAB_YAML = """
NWBFile:
  related_publications: ["doi:10.1016/j.neuron.2016.12.011"]
  protocol: IACUC 42
  notes: implanted 2026-02-01
Subject:
  date_of_birth: 2026-01-05T00:00:00+00:00
  weight: 25 g
Ecephys:
  Device: [{name: NP1, description: Neuropixels 1.0, manufacturer: IMEC}]
  ElectrodeGroup: [{name: probe, description: "AP -3.5, ML 2.5", location: VISp, device: NP1}]
"""


@pytest.fixture
def session(tmp_path):
    """A closed session recorded with species 'mouse' (as RECORD accepted before it checked), unsealed at the end."""
    cfg = small_config(tmp_path / "data", probe_channels=4)
    folder = record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=20)), "S1", Recording(seconds=4.0))
    s = read_session(folder)
    s["metadata"]["subject"]["species"] = "mouse"
    write_json_atomic(folder / SESSION_FILE, s)
    yield folder
    unseal_session(folder)


def _species(master: Path) -> str:
    with h5py.File(master, "r") as f:
        return f["general/subject/species"][()].decode()


def _stream_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "streams").glob("*.h5"))}


def test_amend_before_finalize_fixes_what_finalize_would_refuse(session):
    with pytest.raises(MetadataError, match=r"subject.species: 'mouse': .*\(check_subject_species_form\)"):
        check_metadata(read_session(session)["metadata"], "S1")
    a = amend_session(session, {"subject": {"species": "Mus musculus"}}, who="Doe, Jane")
    assert a["who"] == "Doe, Jane" and a["what"] == ["subject.species: 'mouse' -> 'Mus musculus'"]
    s = read_session(session)
    assert s["state"] == "closed" and s["metadata"]["subject"]["species"] == "Mus musculus"
    assert s["amendments"] == [a]
    with pytest.raises(MetadataError, match=r"subject.sex: 'male': .*\(check_subject_sex\)"):  # checked as RECORD
        amend_session(session, {"subject": {"sex": "male"}}, who="x")
    assert read_session(session)["amendments"] == [a]
    # A lab's neuroconv metadata file, through the CLI: its values land in the master that finalize writes.
    (session.parent / "lab.yaml").write_text(LAB_YAML)
    out = zygote.run([sys.executable, "-m", "acqd.cli", "amend", str(session), "--metadata",
                          str(session.parent / "lab.yaml")], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0 and "subject.weight: None -> '25 g'" in out.stdout, out.stderr
    assert read_session(session)["metadata"]["ecephys"]["probe"]["device"]["manufacturer"] == "IMEC"
    report = finalize_session(session)
    assert report.state == "finalized" and _species(session / "S1.nwb") == "Mus musculus"
    with h5py.File(session / "S1.nwb", "r") as f:
        assert f["general/subject/weight"][()].decode() == "25 g"
        assert f["general/subject/date_of_birth"][()].decode().startswith("2026-01-05T00:00:00")
        assert f["general/protocol"][()].decode() == "IACUC 42"
        assert [p.decode() for p in f["general/related_publications"][:]] == ["doi:10.1016/j.neuron.2016.12.011"]
        assert f["general/notes"][()].decode().startswith("implanted 2026-02-01\n\nWritten by acqd finalize.")


def test_amend_after_finalize_rewrites_only_the_master(session):
    amend_session(session, {"subject": {"species": "Mus musculus"}}, who="x")
    finalize_session(session)
    master = session / "S1.nwb"
    keywords = read_session(session)["metadata"].get("keywords", [])
    before, old_master = _stream_digests(session), hashlib.sha256(master.read_bytes()).hexdigest()
    out = zygote.run([sys.executable, "-m", "acqd.cli", "amend", str(session), "--json", "--who", "Doe, Jane",
                          "--set", "subject.species=http://purl.obolibrary.org/obo/NCBITaxon_10090",
                          "--set", "keywords=[V1, go/no-go]", "--set", "protocol=IACUC 42"],
                     capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    a = json.loads(out.stdout)
    assert a["what"] == [f"keywords: {keywords!r} -> ['V1', 'go/no-go']", "protocol: None -> 'IACUC 42'",
                         "subject.species: 'Mus musculus' -> 'http://purl.obolibrary.org/obo/NCBITaxon_10090'"]
    assert a["previous_master_sha256"] == old_master
    assert a["master_sha256"] == hashlib.sha256(master.read_bytes()).hexdigest() != old_master
    assert _stream_digests(session) == before  # the sealed stream files are untouched, and still sealed
    assert all(is_immutable(p) for p in (session / "streams").glob("*.h5")) == is_immutable(master)
    assert verify_manifest(session) == []
    assert subprocess.run(["sha256sum", "--quiet", "-c", "manifest.sha256"], cwd=session,
                          timeout=TIMEOUT_S).returncode == 0
    s = read_session(session)
    assert s["state"] == "finalized" and s["amendments"][-1] == a and len(s["amendments"]) == 2
    assert _species(master) == "http://purl.obolibrary.org/obo/NCBITaxon_10090"
    assert validate(path=str(master)) == []
    check = check_master(master, {})
    assert check.ok and not [m for m in check.inspector if m["check"].startswith("check_subject")]
    with h5py.File(master, "r") as f:
        assert [k.decode() for k in f["general/keywords"][:]] == ["V1", "go/no-go"]
        assert f["general/protocol"][()].decode() == "IACUC 42"
    with pytest.raises(MetadataError, match="ecephys.probe.location cannot change after finalize"):
        amend_session(session, {"ecephys": {"probe": {"location": "CA1"}}}, who="x")
    assert verify_manifest(session) == []


def test_a_recording_session_is_never_amended(session):
    s = read_session(session)
    write_json_atomic(session / SESSION_FILE, {**s, "state": "recording"})
    with pytest.raises(SessionError, match="state 'recording'"):
        amend_session(session, {"subject": {"species": "Mus musculus"}}, who="x")
