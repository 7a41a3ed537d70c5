"""The rig config's JSON Schema and docs/config.md are generated from the models and kept current."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import yaml

import acqd.config
import acqd.metadata
from acqd.config.doc import json_schema, markdown, schema_text
from tests import zygote
from tests.conftest import ROOT

SCHEMA_FILE = ROOT / "configs" / "rig.schema.json"
PAGE = ROOT / "docs" / "config.md"
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_committed_schema_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), \
        "configs/rig.schema.json is stale: regenerate it with `acqd config-schema > configs/rig.schema.json`"


def test_the_config_page_is_current():
    assert PAGE.read_text() == markdown(), \
        "docs/config.md is stale: regenerate it with `acqd config-schema --markdown > docs/config.md`"


def test_every_config_field_has_a_meaning():
    models = [m for package in (acqd.config, acqd.metadata) for m in vars(package).values()
              if isinstance(m, type) and issubclass(m, acqd.metadata.Frozen) and m is not acqd.metadata.Frozen]
    undocumented = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
                    if not (f.description or "").strip()]
    assert len(models) >= 10 and undocumented == [], \
        f"give each field a docstring line right below it: {undocumented}"


def test_every_field_is_on_the_page():
    page = PAGE.read_text()
    for model in (acqd.config.RigConfig, acqd.config.StreamConfig, acqd.config.DaemonConfig,
                  acqd.metadata.SessionMetadata, acqd.metadata.Subject, acqd.config.VideoConfig):
        section = page.split(f'<a id="{model.__name__.lower()}"></a>', 1)[1].split("<a id=", 1)[0]
        rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
        assert [r.split("`")[1] for r in rows] == list(model.model_fields)
        assert all(len(r.split(" | ")) == 6 and r.split(" | ")[-1].strip(" |") for r in rows), "an example is missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_name_the_schema_and_satisfy_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    assert (path.parent / first.split("$schema=", 1)[1]).resolve() == SCHEMA_FILE
    schema = json.loads(SCHEMA_FILE.read_text())
    raw = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(schema).validate(raw)
    raw["streams"][0]["colour"] = "blue"
    with pytest.raises(jsonschema.ValidationError, match="colour"):
        jsonschema.Draft202012Validator(schema).validate(raw)


def test_config_schema_command_prints_the_schema():
    out = zygote.run([sys.executable, "-m", "acqd.cli", "config-schema"], capture_output=True, text=True,
                     timeout=60, check=True)
    assert json.loads(out.stdout) == json_schema()
    assert json_schema()["$defs"]["StreamConfig"]["properties"]["max_message_bytes"]["default"] == 64 << 20
