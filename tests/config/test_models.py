"""Config validation: the example rig is valid; bad files get precise, located errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from acqd.config import RigConfig, load_config
from acqd.errors import ConfigError
from tests import zygote
from tests.conftest import EXAMPLE


def test_example_rig_is_valid():
    cfg = load_config(EXAMPLE)
    assert [s.name for s in cfg.streams] == ["probe", "nidaq", "camera", "sensor"]
    assert cfg.reference == "nidaq" and cfg.stream("probe").shape == (385,)
    assert [ln.label for ln in cfg.edge_lines("nidaq")] == ["sync", "strobe:camera"]
    assert cfg.daemon.data_root.is_absolute()


def broken(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["streams"][0].update(dtype="int13"), r"streams\[0\] 'probe'.dtype: .*unknown dtype 'int13'"),
    (lambda r: r["streams"][1].update(shape=[0]), r"streams\[1\] 'nidaq'.shape: .*positive"),
    (lambda r: r["streams"][0].update(sync={"source": "channel", "channel": 999}), "sync channel 999 is outside"),
    (lambda r: r["streams"][3].update(name="probe"),
     r"streams\[3\] 'probe'.name: stream name 'probe' is already used by streams\[0\]"),
    (lambda r: r["streams"][2].update(name="../evil"), r"streams\[2\] '../evil'.name: .*invalid stream name"),
    (lambda r: r.update(reference="nope"), "reference 'nope' is not a configured stream"),
    (lambda r: r["daemon"].update(control={"host": "0.0.0.0"}), "not loopback: set control.token"),
    (lambda r: r["streams"][2]["sync"].update(stream="ghost"), "strobe stream 'ghost'"),
    (lambda r: r["streams"][0].update(rate=-1), r"streams\[0\] 'probe'.rate: .*greater than 0"),
    (lambda r: r["streams"][0].update(colour="blue"),
     r"streams\[0\] 'probe'.colour: unknown key 'colour'; allowed keys: curve, conversion, "),
    (lambda r: r["streams"][0]["sync"].update(bitt=1), r"'probe'.sync.bitt: unknown key 'bitt'; allowed keys: bit, "),
    (lambda r: r["streams"][0].update(name="p" * 33), r"'ppp.*'.name: stream name 'p+' is 33 bytes; the wire header's"),
    # Issue 23.2: a subject in the rig config was recorded into every session, whichever animal was on the rig.
    (lambda r: r["metadata"].update(subject={"subject_id": "mouse001"}),
     r"metadata: subject: the rig config holds rig-level metadata only \(lab, institution, experimenters, devices\)"),
    (lambda r: r["metadata"].update(Subject={"subject_id": "mouse001"}), r"metadata: Subject: the rig config holds"),
    (lambda r: r.update(metadata={"NWBFile": {"lab": "x", "session_id": "s1"}}), r"metadata: NWBFile.session_id: "),
])
def test_bad_config_errors_name_the_place(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(broken(tmp_path, edit))


def test_check_config_command(tmp_path):
    ok = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(EXAMPLE)], capture_output=True,
                    text=True, timeout=60)
    assert ok.returncode == 0 and "4 streams" in ok.stdout
    bad = broken(tmp_path, lambda r: r["streams"][0].update(dtype="complex64"))
    out = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(bad)], capture_output=True,
                     text=True, timeout=60)
    assert out.returncode == 2 and "streams[0] 'probe'.dtype" in out.stderr and "numeric" in out.stderr
    (tmp_path / "junk.yaml").write_text("streams: [unclosed")
    out = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(tmp_path / "junk.yaml")],
                     capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid YAML" in out.stderr


FIVE_MISTAKES = """\
daemon:
  data_root: data
  flush_intervall_s: 0.5
reference: nidaq
streams:
  - {name: nidaq, endpoint: "tcp://127.0.0.1:5552", dtype: int16, shape: [9], rate: 30000.0,
     sync: {source: channel, channel: 8}}
  - name: probe
    endpoint: tcp://127.0.0.1:5551
    dtype: int13
    rate: 30000.0
  - name: probe
    endpoint: tcp://localhost:5552
    dtype: int16
    rate: -1
"""


def test_five_mistakes_get_five_located_messages_in_one_run(tmp_path):
    path = tmp_path / "five.yaml"
    path.write_text(FIVE_MISTAKES)
    out = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(path)], capture_output=True,
                     text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"acqd: error: {path}: 5 problems"
    assert lines[1:] == [
        f"{path}:3:3: daemon.flush_intervall_s: unknown key 'flush_intervall_s'; allowed keys: flush_interval_s, "
        "fsync_interval_s, " + lines[1].split("fsync_interval_s, ", 1)[1],
        f"{path}:10:12: streams[1] 'probe'.dtype: unknown dtype 'int13'",
        f"{path}:12:11: streams[2] 'probe'.name: stream name 'probe' is already used by streams[1]",
        f"{path}:13:15: streams[2] 'probe'.endpoint: endpoint tcp://localhost:5552 is already used by streams[0] "
        "'nidaq'",
        f"{path}:15:11: streams[2] 'probe'.rate: must be greater than 0, got -1",
    ]
    for word in ("Value error", "pydantic", "http", "Extra inputs", "Input should"):
        assert word not in out.stderr


def test_cross_field_rules_hold_when_the_model_is_built_directly():
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["streams"][1]["endpoint"] = raw["streams"][0]["endpoint"]
    with pytest.raises(ValidationError, match=r"streams\[1\].endpoint: endpoint tcp://127.0.0.1:5551 is already used"):
        RigConfig.model_validate(raw)


def test_a_key_given_twice_is_a_problem_not_a_silent_overwrite(tmp_path):
    text = EXAMPLE.read_text().replace("    rate: 60.0\n", "    rate: 60.0\n    rate: 30.0\n", 1)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rig.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"rig.yaml:\d+:5: streams\[2\] 'camera'.rate: key 'rate' is given twice"):
        load_config(tmp_path / "configs" / "rig.yaml")


def test_yaml_syntax_errors_are_located(tmp_path):
    (tmp_path / "junk.yaml").write_text("daemon:\n  data_root: [unclosed\n")
    with pytest.raises(ConfigError, match=r"junk.yaml:3:1: not valid YAML"):
        load_config(tmp_path / "junk.yaml")


def test_a_rig_file_without_data_root_takes_it_from_the_environment_or_the_flag(tmp_path):
    """The data root is per machine: a rig file shared between PCs leaves it out (ACQD_DATA_ROOT, --data-root)."""
    rootless = broken(tmp_path, lambda r: [r["daemon"].pop("data_root"), *(s.pop("probe", None) for s in r["streams"])])
    env = {**os.environ, "ACQD_DATA_ROOT": "rel/data"}
    env.pop("ACQD_CONFIG", None)
    out = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(rootless)], capture_output=True,
                     text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0 and f"data root {tmp_path / 'rel' / 'data'}" in out.stdout, out.stderr
    assert load_config(rootless, tmp_path / "flag").daemon.data_root == tmp_path / "flag"
    env.pop("ACQD_DATA_ROOT")
    out = zygote.run([sys.executable, "-m", "acqd.cli", "check-config", str(rootless)], capture_output=True,
                     text=True, timeout=60, env=env)
    assert out.returncode == 2 and "required key 'data_root' is missing (or give it as ACQD_DATA_ROOT or --data-root)" \
        in out.stderr
