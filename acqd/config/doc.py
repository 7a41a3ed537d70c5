"""The rig config's JSON Schema and its reference page, both generated from the models in ``acqd.config``.

``acqd config-schema`` prints the schema (committed as configs/rig.schema.json, which the example configs
name for editors); ``acqd config-schema --markdown`` prints docs/config.md. A field's meaning is its
docstring (or ``description=``); a field added to a model is covered by regenerating both, and
tests/config/test_doc.py fails while either committed copy is stale.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel

from acqd.config import RigConfig, load_config
from acqd.metadata import SessionMetadata

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
EXAMPLE_RIG = Path(__file__).resolve().parents[2] / "configs" / "rig.yaml"
"""Where the page's examples come from (a field the example rig does not set shows its default)."""

EXAMPLE_SUBJECT = {"subject_id": "M12", "species": "Mus musculus", "sex": "F", "age": "P90D"}
"""The subject the page's examples show (a session's, never the rig config's)."""

EXTRA_EXAMPLES: dict[tuple[str, str], object] = {
    ("RigConfig", "metadata"): {"session_description": "example rig session", "lab": "Example Lab"},
    ("ControlConfig", "token"): "change-me-to-a-long-random-string",
    ("StreamConfig", "chunk_rows"): 3000,
    ("StreamConfig", "compression"): "blosc-lz4",
    ("StreamConfig", "max_file_bytes"): 2_000_000_000,
    ("StreamConfig", "max_file_seconds"): 300.0,
    ("StreamConfig", "video"): {"codec": "ffv1", "frames_per_file": 3600},
    ("StreamConfig", "socket"): "pull",
    ("StreamConfig", "bind"): True,
    ("StreamConfig", "lsl"): {"name": "BioSemi", "type": "EEG"},
    ("StreamConfig", "curve"): {"secret_key_file": "/etc/acqd/curve/acqd.key_secret",
                                "client_keys_dir": "/etc/acqd/curve/drivers"},
    ("CurveKeys", "secret_key_file"): "/etc/acqd/curve/acqd.key_secret",
    ("CurveKeys", "client_keys_dir"): "/etc/acqd/curve/drivers",
    ("ProbeConfig", "manufacturer"): "IMEC",
    ("ProbeConfig", "model"): "PRB_1_4_0480_1",
    ("StreamConfig", "stimulus"): {"images": "stimuli/gratings"},
    ("StimulusConfig", "images"): "stimuli/gratings",
    ("StimulusConfig", "field_of_view"): [0.52, 0.29],
    ("StimulusConfig", "distance"): 0.15,
    ("StimulusConfig", "orientation"): "row 0 is the top of the monitor, seen from the subject",
    ("RigConfig", "ship"): [{"name": "nas", "remote": "/mnt/nas/acqd", "delete_after": {"verified_copies": 1}}],
    ("ShipDestination", "rclone_config"): "/etc/acqd/rclone.conf",
    ("RigConfig", "node"): "ephys",
    ("RigConfig", "followers"): [{"name": "video", "url": "http://10.0.0.12:8600", "token_file": "/etc/acqd/video.token"}],
    ("Follower", "name"): "video",
    ("Follower", "url"): "http://10.0.0.12:8600",
    ("Follower", "token"): "the-followers-control-token",
    ("Follower", "token_file"): "/etc/acqd/video.token",
    ("ShipDestination", "remote"): "lab-sftp:data/rig1",
    ("ShipDestination", "bwlimit"): "50M",
    ("ShipDestination", "delete_after"): {"verified_copies": 2, "min_age_days": 14},
    ("ShipDestination", "webhook"): {"url": "https://pipeline.example.org/acqd"},
    ("DeleteAfter", "free_below_bytes"): 500_000_000_000,
    ("Webhook", "url"): "https://pipeline.example.org/acqd",
    ("StreamConfig", "writer_group"): "valves",
    ("DaemonConfig", "labrecorder"): {"host": "127.0.0.1", "port": 22345},
    ("LslSource", "name"): "BioSemi",
    ("LslSource", "type"): "Markers",
    ("LslSource", "source_id"): "biosemi-ab12",
    ("LslSource", "nominal_rate"): 500.0,
    ("StrobeSync", "stream"): "nidaq",
    ("StrobeSync", "channel"): 8,
    ("SessionMetadata", "experiment_description"): "visual change detection, 3 weeks of training",
    ("SessionMetadata", "keywords"): ["visual cortex", "Neuropixels"],
    ("Subject", "strain"): "C57BL/6J",
    ("Subject", "genotype"): "Pvalb-IRES-Cre/wt",
    ("Subject", "description"): "implanted 2026-01-12, left hemisphere",
    ("Subject", "age"): "P90D/P120D",
    ("Subject", "date_of_birth"): "2026-01-05T00:00:00+00:00",
    ("Subject", "weight"): "25 g",
    ("SessionMetadata", "session_id"): "M12-day3",
    ("SessionMetadata", "related_publications"): ["doi:10.1016/j.neuron.2016.12.011"],
    ("SessionMetadata", "protocol"): "IACUC 2026-042",
    ("SessionMetadata", "notes"): "the animal was calm",
    ("SessionMetadata", "surgery"): "headpost and craniotomy over left V1, 2026-01-12",
    ("SessionMetadata", "pharmacology"): "none",
    ("SessionMetadata", "virus"): "AAV9-Syn-GCaMP8m, 1e12 vg/ml, V1",
    ("SessionMetadata", "stimulus_notes"): "drifting gratings, 8 directions",
    ("SessionMetadata", "data_collection"): "head-fixed on a running wheel",
    ("SessionMetadata", "bids"): {"sub": "M12", "ses": "3", "task": "gonogo", "run": "1"},
}
"""Examples for fields the example rig leaves out and whose default says little."""


def json_schema() -> dict:
    """The JSON Schema of a rig config file (draft 2020-12), every field described."""
    return {"$schema": SCHEMA_DIALECT, **RigConfig.model_json_schema()}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def markdown(example: Path | None = EXAMPLE_RIG) -> str:
    """docs/config.md: one table per section of the file; every field's type, default, constraints, meaning
    and one example (from ``example`` when it sets the field)."""
    examples = _examples(load_config(example), yaml.safe_load(example.read_text())) if example and example.exists() \
        else {}
    out = [
        "# Rig config reference",
        "",
        "<!-- Generated from acqd/config/ and acqd/metadata/ by `acqd config-schema --markdown > docs/config.md`; do not edit. -->",
        "",
        "A rig config is one YAML file: the daemon's settings, the streams, the reference clock and default",
        "session metadata. `acqd check-config FILE` reports every problem in it at once, each with its line",
        "and column. Editors that speak the YAML language server (VS Code's YAML extension, JetBrains IDEs,",
        "Neovim) validate and complete a file that starts with",
        "",
        "```yaml",
        "# yaml-language-server: $schema=rig.schema.json",
        "```",
        "",
        "where `rig.schema.json` is a copy of `configs/rig.schema.json` (or the output of `acqd config-schema`).",
        "The example rig, `configs/rig.yaml`, uses every section below.",
    ]
    rig, meta = json_schema(), SessionMetadata.model_json_schema()
    defs = {**rig["$defs"], **meta.get("$defs", {})}
    sections = [*_sections(rig, ""), *_sections(meta, "metadata")]
    for path, name, model in sections:
        out += ["", f'<a id="{name.lower()}"></a>', f"## `{path}`" if path else "## Top level", ""]
        if model.get("description"):
            out += [" ".join(model["description"].split()), ""]
        if path == "metadata":
            out += ["The rig config's `metadata:` holds rig-level defaults only (lab, institution, experimenters, "
                    "devices): a config with `subject`, `session_id` or `bids` is refused. Each session brings its "
                    "subject (record request, `acqd record --subject-id ...`, `--metadata FILE`, the console's "
                    "form); a session's metadata replaces each block of the defaults it gives, and is checked "
                    "when the recording starts.", ""]
        out += ["| key | type | default | constraints | meaning | example |", "|---|---|---|---|---|---|"]
        for key, prop in model.get("properties", {}).items():
            required = key in model.get("required", [])
            ref = _ref_name(prop)
            meaning = prop.get("description") or (defs[ref].get("description", "") if ref else "")
            example = EXTRA_EXAMPLES.get((name, key), examples.get((name, key), prop.get("default")))
            shown = "" if example is None else f"`{_yaml({key: example})}`"
            if len(shown) > 80 and ref:
                shown = f"see [{ref}](#{ref.lower()})"
            out.append("| " + " | ".join([
                f"`{key}`", _type(prop), "required" if required else _inline(prop),
                _constraints(prop), _cell(meaning), shown,
            ]) + " |")
    return "\n".join(out) + "\n"


# -- walking the schema ------------------------------------------------------------------------------------------


def _sections(schema: dict, root: str) -> Iterator[tuple[str, str, dict]]:
    """(path in the file, model name, model schema) for the model at ``root`` and every model under it."""
    defs = schema.get("$defs", {})
    seen: set[str] = set()
    queue: list[tuple[str, str, dict]] = [(root, schema.get("title", ""), schema)]
    while queue:
        path, name, model = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        yield path, name, model
        for key, prop in model.get("properties", {}).items():
            for ref, tag in _refs(prop):
                sub = f"{path}.{key}".lstrip(".") + ("[]" if _is_array(prop) else "")
                queue.append((sub + (f" (source: {tag})" if tag else ""), ref, defs[ref]))


def _refs(prop: dict) -> Iterator[tuple[str, str | None]]:
    """Models a property holds: (name, discriminator tag or None)."""
    for s in _options(prop):
        if "$ref" in s:
            yield s["$ref"].split("/")[-1], None
        elif "discriminator" in s:
            for tag, ref in s["discriminator"]["mapping"].items():
                yield ref.split("/")[-1], tag
        elif "items" in s:
            yield from _refs(s["items"])


def _options(prop: dict) -> list[dict]:
    return prop["anyOf"] if "anyOf" in prop else [prop]


def _is_array(prop: dict) -> bool:
    return any(s.get("type") == "array" and "$ref" in s.get("items", {}) for s in _options(prop))


def _ref_name(prop: dict) -> str | None:
    refs = [r for r, _ in _refs(prop)]
    return refs[0] if len(refs) == 1 else None


def _type(prop: dict) -> str:
    """A property's type in words, models linked to their section."""
    parts = []
    for s in _options(prop):
        if "$ref" in s:
            name = s["$ref"].split("/")[-1]
            parts.append(f"[{name}](#{name.lower()})")
        elif "discriminator" in s:
            parts.append(" or ".join(f"[{r.split('/')[-1]}](#{r.split('/')[-1].lower()})"
                                     for r in s["discriminator"]["mapping"].values()))
        elif "enum" in s:
            parts.append("one of " + ", ".join(f"`{v}`" for v in s["enum"]))
        elif "const" in s:
            parts.append(f"`{s['const']}`")
        elif s.get("type") == "array":
            parts.append(f"list of {_type(s.get('items', {}))}")
        elif s.get("type") == "object":
            parts.append("mapping")
        elif s.get("type") == "null":
            parts.append("null")
        else:
            parts.append(s.get("format", s.get("type", "any")))
    return " or ".join(parts)


_BOUNDS = {"minimum": "≥ {}", "exclusiveMinimum": "> {}", "maximum": "≤ {}", "exclusiveMaximum": "< {}",
           "minLength": "at least {} character(s)", "maxLength": "at most {} character(s)",
           "minItems": "at least {} item(s)", "maxItems": "at most {} item(s)", "pattern": "matches `{}`"}


def _constraints(prop: dict) -> str:
    found = [text.format(s[k]) for s in _options(prop) for k, text in _BOUNDS.items() if k in s]
    return ", ".join(found)


def _examples(cfg: RigConfig, raw: dict) -> dict[tuple[str, str], object]:
    """(model, field) -> the value the example config gives it, as written in the YAML."""
    found: dict[tuple[str, str], object] = {}

    def walk(model: BaseModel, raw_model: object) -> None:
        if not isinstance(raw_model, dict):
            return
        for name in model.model_fields_set:
            found.setdefault((type(model).__name__, name), raw_model.get(name))
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, raw_model.get(name))
            elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
                for item, raw_item in zip(value, raw_model.get(name) or []):
                    walk(item, raw_item)

    walk(cfg, raw)
    session = {**(raw.get("metadata") or {}), "subject": EXAMPLE_SUBJECT}  # a session's: the rig config has none
    walk(SessionMetadata.model_validate(session), session)
    return found


def _yaml(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip().removeprefix(
        "{").removesuffix("}")


def _inline(prop: dict) -> str:
    return f"`{json.dumps(prop['default'])}`" if "default" in prop else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
