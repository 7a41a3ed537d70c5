"""Config validation: the example rig is valid; bad files get precise, located errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from acqd.config import load_config
from acqd.errors import ConfigError
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
    (lambda r: r["streams"][3].update(name="probe"), "duplicate stream names: \\['probe'\\]"),
    (lambda r: r["streams"][2].update(name="../evil"), r"streams\[2\] '../evil'.name: .*invalid stream name"),
    (lambda r: r.update(reference="nope"), "reference 'nope' is not a configured stream"),
    (lambda r: r["daemon"].update(control={"host": "0.0.0.0"}), "not loopback: set control.token"),
    (lambda r: r["streams"][2]["sync"].update(stream="ghost"), "strobe stream 'ghost'"),
    (lambda r: r["streams"][0].update(rate=-1), r"streams\[0\] 'probe'.rate: .*greater than 0"),
    (lambda r: r["streams"][0].update(colour="blue"), r"streams\[0\] 'probe'.colour: Extra inputs"),
])
def test_bad_config_errors_name_the_place(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(broken(tmp_path, edit))


def test_check_config_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "acqd.cli", "check-config", str(EXAMPLE)], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "4 streams" in ok.stdout
    bad = broken(tmp_path, lambda r: r["streams"][0].update(dtype="complex64"))
    out = subprocess.run([sys.executable, "-m", "acqd.cli", "check-config", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "streams[0] 'probe'.dtype" in out.stderr and "numeric" in out.stderr
    (tmp_path / "junk.yaml").write_text("streams: [unclosed")
    out = subprocess.run([sys.executable, "-m", "acqd.cli", "check-config", str(tmp_path / "junk.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
