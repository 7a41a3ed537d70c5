"""The multi-PC part of the rig config: ``node`` and the leader's ``followers`` (acqd.config.nodes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from acqd.config import load_config
from acqd.errors import ConfigError
from tests.conftest import EXAMPLE
from tests.config.test_models import broken

FOLLOWER = {"name": "video", "url": "http://10.0.0.12:8600", "token": "s3cret"}


def rig(tmp_path: Path, edit) -> Path:
    """The example rig edited, in tmp_path with its probe file (relative paths then resolve there)."""
    shutil.copy(EXAMPLE.parent / "probe-np1-bank0.json", tmp_path)
    return broken(tmp_path, edit)


def test_a_leader_config_names_its_followers_and_a_token_file_is_relative_to_the_config(tmp_path):
    (tmp_path / "video.token").write_text("from-a-file\n")
    path = rig(tmp_path, lambda r: r.update(node="ephys", followers=[
        FOLLOWER, {"name": "behaviour", "url": "https://[::1]:8601", "token_file": "video.token"}]))
    cfg = load_config(path)
    assert cfg.node == "ephys" and [f.name for f in cfg.followers] == ["video", "behaviour"]
    assert cfg.followers[1].token_file == tmp_path / "video.token"
    assert [f.read_token() for f in cfg.followers] == ["s3cret", "from-a-file"]
    assert cfg.followers[0].max_clock_offset_s == 1.0
    assert cfg.model_dump(mode="json")["followers"][0]["token"] == "***", "a dump (session.json) holds no secret"


def test_every_config_has_a_node_name_by_default(tmp_path):
    cfg = load_config(rig(tmp_path, lambda r: None))
    assert cfg.node == "main" and cfg.followers == ()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(node="ephys pc"), r"node: invalid node name 'ephys pc': use 1-32 letters"),
    (lambda r: r.update(node="x" * 33), r"node: invalid node name"),
    (lambda r: r.update(followers=[FOLLOWER, {**FOLLOWER, "url": "http://10.0.0.13:8600"}]),
     r"followers: follower name 'video' is used twice"),
    (lambda r: r.update(node="video", followers=[FOLLOWER]), r"followers: follower 'video' has this PC's own node"),
    (lambda r: r.update(followers=[{**FOLLOWER, "token_file": "t"}]), r"give exactly one of token, token_file"),
    (lambda r: r.update(followers=[{"name": "video", "url": "http://h:1"}]), r"give exactly one of token, token_file"),
    (lambda r: r.update(followers=[{**FOLLOWER, "url": "ftp://h:1"}]),
     r"followers\[0\] 'video'.url: invalid follower url 'ftp://h:1': give http\(s\)://host:port"),
    (lambda r: r.update(followers=[{**FOLLOWER, "url": "http://h:1/api/status"}]), r"invalid follower url"),
    (lambda r: r.update(followers=[{**FOLLOWER, "name": "a/b"}]), r"invalid node name 'a/b'"),
])
def test_bad_rig_parts_get_one_located_line(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(rig(tmp_path, edit))


def test_an_unreadable_token_file_is_a_clear_error_at_use(tmp_path):
    cfg = load_config(rig(tmp_path, lambda r: r.update(followers=[{**FOLLOWER, "token": None,
                                                                      "token_file": "missing"}])))
    with pytest.raises(OSError):
        cfg.followers[0].read_token()
    (tmp_path / "missing").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        cfg.followers[0].read_token()
