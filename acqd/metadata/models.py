"""The session's content as acqd records it: the subject, the session and per-stream ecephys metadata models.

This module owns what a valid session metadata record is (``SessionMetadata`` and its parts), checked at RECORD
and at amend; ``acqd.metadata.layouts`` turns what users write (neuroconv's layout, ``--set``, BIDS names) into
it. ``Frozen`` is the base of every config and metadata model (``acqd.config`` builds on it).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from acqd.metadata.probes import is_mouse, unknown_areas


class Frozen(BaseModel):
    """Immutable, no unknown keys, and each field's docstring is its description (docs/config.md, the schema)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Subject(Frozen):
    """The animal. Checked at RECORD with the nwbinspector rules finalize applies (DANDI config)."""

    subject_id: str = Field(min_length=1)
    """Identifier of the animal."""
    species: str = Field(min_length=1, description="Latin binomial, e.g. Mus musculus, or an NCBI taxonomy URI")
    """Latin binomial, e.g. Mus musculus, or an NCBI taxonomy URI (http://purl.obolibrary.org/obo/NCBITaxon_10090)."""
    sex: str = Field(min_length=1, description="M, F, U (unknown) or O (other); XX or XO for C. elegans")
    """M, F, U (unknown) or O (other); XX or XO for C. elegans."""
    age: str | None = Field(None, description="ISO 8601 duration, e.g. P90D, or a range, e.g. P90D/P120D")
    """ISO 8601 duration, e.g. P90D, or a range, e.g. P90D/P120D; age or date_of_birth is required."""
    date_of_birth: datetime | None = None
    """Date of birth with its time zone, e.g. 2026-01-05T00:00:00+00:00 (instead of, or as well as, age)."""
    description: str = ""
    """Free text about the subject."""
    strain: str | None = None
    """Strain, e.g. C57BL/6J."""
    genotype: str | None = None
    """Genotype, e.g. Pvalb-IRES-Cre."""
    weight: str | None = None
    """Weight with its unit, e.g. 25 g."""
    # The forms of species, sex, age and weight are nwbinspector's checks (acqd.finalize.nwb.metadata_problems),
    # run at RECORD and amend: the same rules finalize applies, never a second copy of them here.


class DeviceMetadata(Frozen):
    """The recording device of an ephys stream as NWB describes it (neuroconv's ``Ecephys.Device``)."""

    name: str | None = None
    """Device name in the NWB file; default: the stream's name."""
    description: str | None = None
    """What the device is."""
    manufacturer: str | None = None
    """Who made it, e.g. IMEC."""


class EcephysMetadata(Frozen):
    """Where one ephys stream's electrodes sit in this subject: it changes per session, unlike the probe layout."""

    location: str | None = None
    """Allen CCF acronym of the area the probe targets, e.g. VISp; applies to every channel without its own."""
    channel_locations: tuple[str, ...] | None = None
    """One Allen CCF acronym per channel, in the stream's channel order (overrides location)."""
    description: str | None = None
    """The electrode group's description, e.g. the insertion's coordinates and angle."""
    device: DeviceMetadata | None = None
    """Overrides the device the rig config describes for this stream."""


class SessionMetadata(Frozen):
    """Metadata a recording cannot start without; it is written into every stream file at creation."""

    session_description: str = Field(min_length=1)
    """What this session is."""
    experimenter: tuple[str, ...] = ()
    """People who ran the session, "Last, First" or as the lab writes them."""
    institution: str | None = None
    """Institution where the session was recorded."""
    lab: str | None = None
    """Lab where the session was recorded."""
    experiment_description: str | None = None
    """The experiment this session belongs to."""
    keywords: tuple[str, ...] = ()
    """Search terms for the dataset."""
    subject: Subject
    """The animal recorded."""
    ecephys: dict[str, EcephysMetadata] = {}
    """Per ephys stream name: where its electrodes are in this subject."""
    session_id: str | None = None
    """Session folder name (and NWB session_id) when the record request names none."""
    related_publications: tuple[str, ...] = ()
    """Publications about this data, as DOIs, e.g. doi:10.1016/j.neuron.2016.12.011."""
    protocol: str | None = None
    """Experimental protocol (e.g. the IACUC protocol number)."""
    notes: str | None = None
    """Notes about the session, written before acqd's own notes in the NWB file."""
    surgery: str | None = None
    """Surgeries performed on the subject."""
    pharmacology: str | None = None
    """Drugs and other pharmacology used in the session."""
    virus: str | None = None
    """Viruses injected: name, source, titer, coordinates."""
    stimulus_notes: str | None = None
    """What stimuli were used (NWB /general/stimulus)."""
    data_collection: str | None = None
    """How the data were collected."""
    bids: dict[str, str] | None = None
    """BIDS entities of the session (sub, ses, task, acq, run): they name the session folder and the export."""

    @model_validator(mode="after")
    def _allen_ccf(self) -> SessionMetadata:
        if not self.ecephys or not is_mouse(self.subject.species):  # nwbinspector checks mice only
            return self
        for stream, e in self.ecephys.items():
            bad = unknown_areas([*([e.location] if e.location else []), *(e.channel_locations or ())])
            if bad:
                raise ValueError(f"ecephys.{stream}: {', '.join(map(repr, bad))} not in the Allen Mouse Brain CCF "
                                 "ontology (use an acronym such as VISp or CA1, or the full name)")
        return self
