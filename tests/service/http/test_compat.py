"""The compatibility surfaces' shared rules (acqd.service.http.compat): unique session names, folder names from any
text, incidents summarised per kind and reason."""

from __future__ import annotations

import pytest

from acqd.service.http.compat import Incidents, folder_name, unique_session


def test_a_taken_name_gets_the_next_free_suffix_and_stays_valid(tmp_path):
    assert unique_session(tmp_path, "m1") == "m1"
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1_2").mkdir()
    assert unique_session(tmp_path, "m1") == "m1_3"
    long = "x" * 64
    (tmp_path / long).mkdir()
    assert unique_session(tmp_path, long) == "x" * 62 + "_2"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert unique_session(tmp_path, "dangling") == "dangling_2"
    with pytest.raises(ValueError):
        unique_session(tmp_path, "../x")


@pytest.mark.parametrize("text, name", [("Jörg Müller", "Jorg-Muller"), ("../../etc", "etc"), ("a..b", "a.b"),
                                        ("  ", ""), ("日本", ""), ("-x-", "x"), ("y" * 80, "y" * 64)])
def test_folder_names_from_any_text(text, name):
    assert folder_name(text) == name


class _Sup:
    def __init__(self):
        self.posted = []

    def incident(self, *args):
        pass

    def post(self, fn, *args):
        self.posted.append(args)


def test_incidents_of_one_kind_and_reason_are_summarised_but_renames_never():
    sup = _Sup()
    inc = Incidents(sup, "LabRecorder")
    for _ in range(5):
        inc.report("refused", "too many connections", like="busy")
    inc.report("refused", "a line too long", like="long")
    inc.report("session_renamed", "a -> a_2", summarise=False)
    inc.report("session_renamed", "b -> b_2", summarise=False)
    assert [a[2] for a in sup.posted] == ["LabRecorder: too many connections", "LabRecorder: a line too long",
                                          "LabRecorder: a -> a_2", "LabRecorder: b -> b_2"]
