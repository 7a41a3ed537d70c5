"""Session metadata as labs write it: acqd's own layout, neuroconv's layout, ``--set`` edits, BIDS session names.

This module owns turning what a user hands acqd (a YAML file, a record request's ``metadata``, ``--set
subject.species="Mus musculus"``, ``--bids sub=M12,ses=3``) into acqd's layout (the fields of
``acqd.metadata.SessionMetadata``), and the differences between two metadata records (what an amendment
changed). Unknown keys are errors naming their path, in both layouts: nothing is silently dropped.
Pure functions; the nwbinspector checks of the result live in ``acqd.finalize.nwb.metadata_problems``.

neuroconv's layout (``NWBFile``, ``Subject``, ``Ecephys`` at the top level) maps as follows: ``NWBFile``'s keys
and ``Subject``'s keys are SessionMetadata's and Subject's; ``Ecephys.ElectrodeGroup[i]`` (whose ``name`` is the
acqd stream name) becomes ``ecephys[name]`` with ``location`` and ``description``, and its ``device`` names an
``Ecephys.Device`` entry that becomes ``ecephys[name].device``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from acqd.errors import MetadataError
from acqd.files import read_bounded
from acqd.metadata.models import SessionMetadata

NEUROCONV_SECTIONS = ("NWBFile", "Subject", "Ecephys")
_SET_FIXED = {"session_start_time": "acqd sets it from the reference clock's first sample",
              "identifier": "acqd sets it to the session id"}
BIDS_ENTITIES = {"sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "run": "run"}
"""BIDS entity keys, in the order BIDS puts them in a name, and their long names."""
_BIDS_LABEL = re.compile(r"[A-Za-z0-9]{1,32}")
MAX_FILE_BYTES = 256 << 10
"""A metadata file larger than this is refused before it is parsed (a lab's file is a few kB; PyYAML parses
about 1 MB a second, so a 50 MB file would hold the CLI for minutes)."""
MAX_DEPTH = 16
"""Mappings and lists nested deeper than this are refused (acqd's deepest field is 4 levels down; PyYAML's
composer recurses per level, so deep nesting would end in a RecursionError)."""


def to_acqd(raw: dict | None, where: str = "metadata") -> dict:
    """``raw`` in acqd's layout, converting neuroconv's layout if its sections are present (never mixed)."""
    raw = dict(raw or {})
    if not any(k in raw for k in NEUROCONV_SECTIONS):
        return raw
    mixed = [k for k in raw if k not in NEUROCONV_SECTIONS]
    if mixed:
        raise MetadataError(f"{where}.{mixed[0]}: unknown key in the neuroconv layout (sections: "
                            f"{', '.join(NEUROCONV_SECTIONS)}); do not mix it with acqd's own layout")
    out = _section(raw.get("NWBFile") or {}, f"{where}.NWBFile", _nwbfile_keys())
    for key, why in _SET_FIXED.items():
        if key in out:
            raise MetadataError(f"{where}.NWBFile.{key}: not taken from metadata ({why})")
    if raw.get("Subject") is not None:
        out["subject"] = _section(raw["Subject"], f"{where}.Subject", _subject_keys())
    if raw.get("Ecephys") is not None:
        out["ecephys"] = _ecephys(raw["Ecephys"], f"{where}.Ecephys")
    return out


def check_layout(meta: dict, where: str = "metadata") -> None:
    """Unknown keys in acqd's layout, named by path (SessionMetadata's models forbid extra keys)."""
    try:
        SessionMetadata.model_validate(meta)
    except ValidationError as e:
        extra = [err for err in e.errors() if err["type"] == "extra_forbidden"]
        if extra:
            path = ".".join(str(p) for p in extra[0]["loc"])
            raise MetadataError(f"{where}.{path}: unknown key (not a SessionMetadata field; see docs/config.md)"
                                ) from None


def validation_message(e: ValidationError) -> str:
    """A pydantic error as ``field: problem`` lines."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def load_file(text: str, where: str) -> dict:
    """A metadata YAML file (either layout) as acqd's layout, unknown keys refused."""
    raw = safe_yaml(text, where) or {}
    if not isinstance(raw, dict):
        raise MetadataError(f"{where}: expected a mapping of metadata fields, got {type(raw).__name__}")
    meta = to_acqd(raw, where)
    check_layout(meta, where)
    return meta


def load_path(path: str | Path) -> dict:
    """``load_file`` of the file at ``path``, refused (one line) if it is larger than ``MAX_FILE_BYTES``, is not a
    regular file, or is not UTF-8."""
    data = read_bounded(path, MAX_FILE_BYTES)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return load_file(text, str(path))


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` bounded: nesting deeper than ``MAX_DEPTH`` and aliases (``*name``: a few lines of them
    expand to gigabytes) are refused, and every YAML error becomes one ``MetadataError`` line with line:column."""
    try:
        return yaml.load(text, _BoundedLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise MetadataError(f"{where}{at}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise MetadataError(f"{where}: not YAML ({str(e).splitlines()[0]})") from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit and without aliases (see ``safe_yaml``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not accepted in metadata "
                                              "(write the value out)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_set(items: list[str]) -> dict:
    """``["subject.species=Mus musculus", "keywords=[a, b]"]`` as a nested dict. A value starting with ``[`` or
    ``{`` is read as YAML; any other value is a string as written."""
    out: dict = {}
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise MetadataError(f"--set {item!r}: expected FIELD=VALUE, e.g. subject.species='Mus musculus'")
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = safe_yaml(value, f"--set {path}") if value.lstrip().startswith(("[", "{")) else value
    return out


def with_rig_defaults(rig: dict, session: dict) -> dict:
    """A session's metadata over the rig config's defaults (both in acqd's layout): each top-level block the
    session gives (``subject``, ``ecephys``, ``experimenter``...) replaces the rig's whole, so a metadata file never
    merges into a block it does not describe. The rig config holds no subject (``RigConfig.metadata``)."""
    return {**rig, **session}


def require_subject(meta: dict) -> None:
    """RECORD's first rule: the session names its animal (the rig config never does)."""
    if not meta.get("subject"):
        raise MetadataError("subject: missing: every recording needs its animal (subject.subject_id, subject.species, "
                            "subject.sex, and subject.age or subject.date_of_birth), given with the session: "
                            "acqd record --subject-id M12 --species 'Mus musculus' --sex F --age P90D, --metadata "
                            "FILE, or the console's record form")


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs, as ``field: old -> new`` lines (nested fields dotted), sorted by field."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def parse_bids(text: str) -> dict[str, str]:
    """``sub=M12,ses=3,task=gonogo,run=1`` (long names accepted: subject=, session=, acquisition=)."""
    out = {}
    long = {v: k for k, v in BIDS_ENTITIES.items()}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = long.get(key, key)
        if not sep or key not in BIDS_ENTITIES:
            raise MetadataError(f"--bids {item!r}: expected KEY=LABEL with KEY one of {', '.join(BIDS_ENTITIES)}")
        out[key] = value
    return out


def bids_name(entities: dict[str, str]) -> str:
    """``sub-M12_ses-3_task-gonogo_run-1``: BIDS order, labels alphanumeric, ``sub`` required."""
    unknown = [k for k in entities if k not in BIDS_ENTITIES]
    if unknown:
        raise MetadataError(f"bids.{unknown[0]}: unknown entity (use {', '.join(BIDS_ENTITIES)})")
    if not entities.get("sub"):
        raise MetadataError("bids.sub: the subject label is required")
    for k, v in entities.items():
        if not isinstance(v, str) or not _BIDS_LABEL.fullmatch(v):
            raise MetadataError(f"bids.{k}: label {v!r} must be 1-32 letters or digits (BIDS labels are alphanumeric)")
    return "_".join(f"{k}-{entities[k]}" for k in BIDS_ENTITIES if entities.get(k))


# -- neuroconv's sections ---------------------------------------------------------------------------------------


def _nwbfile_keys() -> set[str]:
    return {k for k in SessionMetadata.model_fields if k not in ("subject", "ecephys")} | set(_SET_FIXED)


def _subject_keys() -> set[str]:
    return set(SessionMetadata.model_fields["subject"].annotation.model_fields)


def _section(section: Any, where: str, known: set[str]) -> dict:
    if not isinstance(section, dict):
        raise MetadataError(f"{where}: expected a mapping, got {type(section).__name__}")
    for k in section:
        if k not in known:
            raise MetadataError(f"{where}.{k}: unknown key (acqd stores: {', '.join(sorted(known - set(_SET_FIXED)))})")
    return dict(section)


def _ecephys(section: Any, where: str) -> dict:
    section = _section(section, where, {"Device", "ElectrodeGroup"})
    devices = {}
    for i, d in enumerate(section.get("Device") or []):
        d = _section(d, f"{where}.Device[{i}]", {"name", "description", "manufacturer"})
        if not d.get("name"):
            raise MetadataError(f"{where}.Device[{i}].name: required (ElectrodeGroup entries refer to it)")
        devices[d["name"]] = d
    out = {}
    for i, g in enumerate(section.get("ElectrodeGroup") or []):
        g = _section(g, f"{where}.ElectrodeGroup[{i}]", {"name", "description", "location", "device"})
        if not g.get("name"):
            raise MetadataError(f"{where}.ElectrodeGroup[{i}].name: required (the acqd stream name)")
        entry = {k: g[k] for k in ("location", "description") if g.get(k) is not None}
        if g.get("device") is not None:
            if g["device"] not in devices:
                raise MetadataError(f"{where}.ElectrodeGroup[{i}].device: {g['device']!r} is not an Ecephys.Device "
                                    f"name ({', '.join(devices) or 'none'})")
            entry["device"] = devices[g["device"]]
        out[g["name"]] = entry
    return out
