"""Session metadata: neuroconv's layout, unknown keys, --set edits, BIDS names, and the nwbinspector rules that
RECORD and amend apply (the ones finalize's inspection refuses or counts as violations)."""

from __future__ import annotations

import pytest

from acqd.finalize.amend import check_metadata
from acqd.metadata import (MetadataError, bids_name, changes, load_file, parse_bids, parse_set, require_subject,
                           with_rig_defaults)

GOOD = {"session_description": "go/no-go, day 3", "experimenter": ["Doe, Jane"],
        "subject": {"subject_id": "M12", "species": "Mus musculus", "sex": "F", "age": "P90D"}}

NEUROCONV = """
NWBFile:
  session_description: go/no-go task, day 3
  experimenter: [Doe, Jane]
  institution: Example Institute
  lab: Example Lab
  experiment_description: visual discrimination
  keywords: [V1, go/no-go]
  related_publications: ["doi:10.1016/j.neuron.2016.12.011"]
  protocol: IACUC 42
  surgery: headpost, craniotomy over V1
  virus: none
  session_id: M12-day3
Subject:
  subject_id: M12
  species: Mus musculus
  sex: F
  date_of_birth: 2026-01-05T00:00:00+00:00
  weight: 25 g
  strain: C57BL/6J
  description: head-fixed on a wheel
Ecephys:
  Device:
    - {name: NP1, description: Neuropixels 1.0, manufacturer: IMEC}
  ElectrodeGroup:
    - {name: probe, description: "insertion at AP -3.5, ML 2.5", location: VISp, device: NP1}
"""


def test_neuroconv_layout_maps_onto_acqds_own():
    meta = load_file(NEUROCONV, "lab.yaml")
    assert meta["session_description"] == "go/no-go task, day 3" and meta["session_id"] == "M12-day3"
    assert meta["related_publications"] == ["doi:10.1016/j.neuron.2016.12.011"] and meta["protocol"] == "IACUC 42"
    assert meta["subject"]["weight"] == "25 g" and meta["subject"]["strain"] == "C57BL/6J"
    assert meta["ecephys"] == {"probe": {"location": "VISp", "description": "insertion at AP -3.5, ML 2.5",
                                         "device": {"name": "NP1", "description": "Neuropixels 1.0",
                                                    "manufacturer": "IMEC"}}}
    dumped = check_metadata(meta, "M12-day3")  # no age: the date of birth is enough
    assert dumped["subject"]["date_of_birth"].startswith("2026-01-05T00:00:00")


@pytest.mark.parametrize("text, path", [
    ("NWBFile: {session_descriptoin: x}", "lab.yaml.NWBFile.session_descriptoin"),
    ("Subject: {subject_id: M1, colour: brown}", "lab.yaml.Subject.colour"),
    ("Ecephys: {ElectricalSeries: {}}", "lab.yaml.Ecephys.ElectricalSeries"),
    ("Ecephys: {ElectrodeGroup: [{name: probe, device: NP9}]}", "lab.yaml.Ecephys.ElectrodeGroup[0].device"),
    ("Ecephys: {Device: [{name: NP1, model: x}]}", "lab.yaml.Ecephys.Device[0].model"),
    ("NWBFile: {session_description: x}\nsubject: {subject_id: M1}", "lab.yaml.subject"),
    ("NWBFile: {session_start_time: 2026-01-01}", "lab.yaml.NWBFile.session_start_time"),
    ("subject: {subject_id: M1, colour: brown}", "lab.yaml.subject.colour"),
    ("session_descriptoin: x", "lab.yaml.session_descriptoin"),
])
def test_unknown_keys_are_refused_with_their_path(text, path):
    with pytest.raises(MetadataError) as e:
        load_file(text, "lab.yaml")
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("field, value, check", [
    ("species", "mouse", "check_subject_species_form"),
    ("species", "", "check_subject_species_exists"),
    ("age", "90 days", "check_subject_age"),
    ("age", None, "check_subject_age"),  # neither age nor date_of_birth
    ("sex", "female", "check_subject_sex"),
    ("subject_id", "M/12", "check_subject_id_no_slashes"),
    ("weight", "25", "check_subject_weight"),
])
def test_each_field_finalize_would_refuse_is_named_with_its_check(field, value, check):
    meta = {**GOOD, "subject": {**GOOD["subject"], field: value}}
    if value == "":  # pydantic refuses an empty species before nwbinspector sees it
        with pytest.raises(MetadataError, match="subject.species"):
            check_metadata(meta, "s1")
        return
    with pytest.raises(MetadataError) as e:
        check_metadata(meta, "s1")
    assert f"subject.{field}: " in str(e.value) and f"({check})" in str(e.value)
    assert [(p["field"], p["check"]) for p in e.value.problems] == [(f"subject.{field}", check)]


@pytest.mark.parametrize("subject", [
    {"species": "http://purl.obolibrary.org/obo/NCBITaxon_10090"}, {"age": "P90D/P120D"}, {"age": "P90D/"},
    {"age": "P1.5Y"}, {"age": None, "date_of_birth": "2026-01-05T00:00:00+00:00"},
    {"species": "Caenorhabditis elegans", "sex": "XO"},
])
def test_what_dandi_accepts_is_accepted(subject):
    check_metadata({**GOOD, "subject": {**GOOD["subject"], **subject}}, "s1")


def test_suggestions_are_not_refusals():
    """An experimenter not in "Last, First" form is a BEST_PRACTICE_SUGGESTION under the DANDI config."""
    check_metadata({**GOOD, "experimenter": ["Operator", "Rig"]}, "s1")


def test_set_edits_and_changes():
    update = parse_set(["subject.species=Mus musculus", "keywords=[V1, LGN]", "subject.subject_id=12"])
    assert update == {"subject": {"species": "Mus musculus", "subject_id": "12"}, "keywords": ["V1", "LGN"]}
    assert changes({"subject": {"species": "mouse", "sex": "F"}}, {"subject": {"species": "Mus musculus", "sex": "F"}}
                   ) == ["subject.species: 'mouse' -> 'Mus musculus'"]
    with pytest.raises(MetadataError, match="FIELD=VALUE"):
        parse_set(["subject.species"])


def test_bids_names():
    assert bids_name(parse_bids("sub=M12,ses=3,task=gonogo,run=1")) == "sub-M12_ses-3_task-gonogo_run-1"
    assert bids_name(parse_bids("run=2,acquisition=np,subject=M12")) == "sub-M12_acq-np_run-2"
    with pytest.raises(MetadataError, match="bids.task: label 'go_no' must be 1-32 letters or digits"):
        bids_name({"sub": "M12", "task": "go_no"})
    with pytest.raises(MetadataError, match="bids.sub: the subject label is required"):
        bids_name({"ses": "1"})
    with pytest.raises(MetadataError, match="KEY one of"):
        parse_bids("subj=M12")


def test_a_session_block_replaces_the_rig_default_whole_and_the_subject_is_required():
    """Issue 23.2: a metadata file for M12 got the demo subject's description merged in. A session's block now
    replaces the rig's whole (nothing of another block leaks in), and a session without a subject is refused."""
    rig = {"lab": "Example Lab", "experimenter": ["Doe, Jane"], "ecephys": {"probe": {"location": "VISp"}}}
    session = {"subject": {"subject_id": "M12"}, "ecephys": {"probe": {"description": "AP -3.5"}}}
    meta = with_rig_defaults(rig, session)
    assert meta == {"lab": "Example Lab", "experimenter": ["Doe, Jane"], "subject": {"subject_id": "M12"},
                    "ecephys": {"probe": {"description": "AP -3.5"}}}
    require_subject(meta)
    for missing in (rig, {**rig, "subject": {}}, {**rig, "subject": None}):
        with pytest.raises(MetadataError, match=r"^subject: missing: every recording needs its animal "
                                                 r"\(subject.subject_id, subject.species, subject.sex"):
            require_subject(missing)
