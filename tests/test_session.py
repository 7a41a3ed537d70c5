"""Session folders: hostile names refused with nothing created; atomic snapshots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from acqd.errors import SessionError
from acqd.session import create_session_dir, session_name, write_json_atomic


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "/tmp/abs", "", "a\0b", "a/b", ".hidden", "x" * 65,
                                  "a..b", "con sole", "tab\t"])
def test_hostile_session_names_create_nothing(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    before = tree(tmp_path)
    with pytest.raises(SessionError):
        create_session_dir(root, name)
    assert tree(tmp_path) == before


def test_row18_existing_session_and_planted_symlink_are_refused(tmp_path):
    root = tmp_path / "root"
    create_session_dir(root, "s1")
    (root / "s1" / "session.json").write_text("{}")
    with pytest.raises(SessionError, match="already exists"):
        create_session_dir(root, "s1")
    assert (root / "s1" / "session.json").read_text() == "{}"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "s2")
    with pytest.raises(SessionError):
        create_session_dir(root, "s2")
    assert not any((tmp_path / "elsewhere").iterdir())


def test_session_name_follows_open_ephys_text_fields():
    assert session_name("mouse1_", "exp", "_a") == "mouse1_exp_a"
    assert session_name("pre_").startswith("pre_20")
    with pytest.raises(SessionError):
        session_name("../", "x")


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    path = tmp_path / "session.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["session.json"]
