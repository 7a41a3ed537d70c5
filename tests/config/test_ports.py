"""A tcp port the rig config names is taken: one line naming the port and the config key, a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from tests import zygote
from tests.conftest import write_rig


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program is listening on (the OS picks it, so no clash with anything else)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_acqd(*args: str) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, "-m", "acqd.cli", *args], capture_output=True, text=True, timeout=60,
                      stdin=subprocess.DEVNULL)


def rig_with(tmp_path, edit) -> str:
    config = write_rig(tmp_path)
    raw = yaml.safe_load(config.read_text())
    edit(raw)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(config)


def test_demo_with_a_stream_port_taken_names_the_port_and_the_key(tmp_path, taken_port):
    config = rig_with(tmp_path, lambda raw: raw["streams"][2].update(endpoint=f"tcp://127.0.0.1:{taken_port}"))
    out = run_acqd("demo", "--config", config, "--data-root", str(tmp_path / "demo"), "--seconds", "1")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"acqd: error: port {taken_port} is already in use: stop what holds it, or change "
        "streams[2] 'camera'.endpoint in the rig config"]
    assert "Traceback" not in out.stdout + out.stderr


def test_daemon_with_its_control_port_taken_names_the_port_and_the_key(tmp_path, taken_port):
    config = rig_with(tmp_path, lambda raw: raw["daemon"]["control"].update(port=taken_port))
    out = run_acqd("serve", "--config", config)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"acqd: error: port {taken_port} is already in use: stop what holds it, or change daemon.control.port "
        "in the rig config"]
