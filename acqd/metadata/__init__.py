"""What describes a session's content, below the rig config.

``models`` holds the session and subject models (``SessionMetadata`` and its parts), checked at RECORD and at
amend; ``layouts`` turns what labs write (acqd's layout, neuroconv's, ``--set`` edits, BIDS names) into acqd's
layout and diffs two records; ``probes`` reads probe layouts and checks brain areas against the Allen CCF.
The public names are re-exported here (``from acqd.metadata import SessionMetadata, merge``).
Imports: ``acqd.errors`` and ``acqd.files`` (bounded file reads) at most; never ``acqd.config`` (the config imports this package, not the reverse).
"""

from acqd.metadata.layouts import (BIDS_ENTITIES, NEUROCONV_SECTIONS, MetadataError, bids_name, changes, check_layout,
                                   load_file, load_path, merge, parse_bids, parse_set, require_subject, to_acqd,
                                   validation_message, with_rig_defaults)
from acqd.metadata.models import DeviceMetadata, EcephysMetadata, Frozen, SessionMetadata, Subject
from acqd.metadata.probes import (FORMATS, ProbeLayout, allen_ccf_terms, contact_columns, detect_format, is_mouse,
                                  read_layout, unknown_areas)

__all__ = ["BIDS_ENTITIES", "FORMATS", "NEUROCONV_SECTIONS", "DeviceMetadata", "EcephysMetadata", "Frozen",
           "MetadataError", "ProbeLayout", "SessionMetadata", "Subject", "allen_ccf_terms", "bids_name", "changes",
           "check_layout", "contact_columns", "detect_format", "is_mouse", "load_file", "load_path", "merge", "parse_bids",
           "parse_set", "read_layout", "require_subject", "to_acqd", "unknown_areas", "validation_message",
           "with_rig_defaults"]
