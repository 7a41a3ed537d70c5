"""The preview hub: writers are told to preview only while someone watches, and every watcher gets the messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

from acqd.record.preview import encode_message, is_message
from acqd.service.previews import MAX_QUEUED, PreviewHub


@dataclass
class FakeWriter:
    ready: bool
    proc: SimpleNamespace
    acked: int = 0


def _writers(**pids: int) -> dict[str, FakeWriter]:
    return {name: FakeWriter(True, SimpleNamespace(pid=pid)) for name, pid in pids.items()}


def test_writers_preview_only_while_watched_and_a_restarted_writer_is_told_again():
    hub, sent = PreviewHub(), []

    def send(name: str, **cmd) -> int:
        sent.append((name, cmd["on"], tuple(cmd["channels"])))
        return len(sent)
    writers = _writers(probe=10, cam=11)
    hub.sync(writers, send)
    assert sent == []  # nobody watches: writers start with preview off, nothing to say

    key, _ = hub.watch()
    hub.sync(writers, send)
    hub.sync(writers, send)
    assert sorted(sent) == [("cam", True, ()), ("probe", True, ())]

    hub.select("probe", [3, 4])
    writers["cam"] = FakeWriter(True, SimpleNamespace(pid=12))  # restarted
    sent.clear()
    hub.sync(writers, send)
    assert sorted(sent) == [("cam", True, ()), ("probe", True, (3, 4))]

    hub.leave(key)
    sent.clear()
    hub.sync(writers, send)
    hub.sync(writers, send)
    assert sorted(sent) == [("cam", False, ()), ("probe", False, ())]
    # Until a writer acknowledges "off", previews it sent before may still arrive: it still counts as previewing.
    assert hub.state()["previewing"] == ["cam", "probe"]
    writers["cam"].acked = sent.index(("cam", False, ())) + 1
    hub.sync(writers, send)
    assert hub.state()["previewing"] == ["probe"]
    writers["probe"] = FakeWriter(True, SimpleNamespace(pid=13))  # replaced before it acknowledged: nothing pending
    sent.clear()
    hub.sync(writers, send)
    assert sent == [] and hub.state()["previewing"] == []


def test_every_watcher_gets_each_message_and_a_slow_one_loses_the_oldest_counted():
    hub = PreviewHub()
    (_, fast), (key, slow) = hub.watch(), hub.watch()
    got = []
    for i in range(MAX_QUEUED + 5):
        hub.publish(encode_message("probe", {"i": i}))
        got.extend(json.loads(m)["i"] for m in fast.take())
    assert got == list(range(MAX_QUEUED + 5))
    assert [json.loads(m)["i"] for m in slow.take()] == list(range(5, MAX_QUEUED + 5)) and slow.dropped == 5
    assert slow.take() == [] and hub.state() == {"watchers": 2, "previewing": [], "received": MAX_QUEUED + 5}
    hub.leave(key)
    assert hub.state()["watchers"] == 1
    assert is_message(encode_message("probe", {"i": 0})) and not is_message(b'{"type":"stats"}')


def test_qc_verdict_prefers_the_reports_own_and_else_lists_the_findings():
    from acqd.service.http.console import qc_verdict

    own = qc_verdict({"verdict": "WARN", "streams": {"cam": {"qc": {"verdict": "WARN", "reasons": ["3 gaps"]}},
                                                     "nidaq": {"qc": {"verdict": "PASS", "reasons": []}}}})
    assert own == {"text": "WARN", "level": "warn", "reasons": ["cam: 3 gaps"]}
    assert qc_verdict({"verdict": "FAIL"})["level"] == "fail" and qc_verdict({"verdict": "PASS"})["level"] == "pass"
    found = qc_verdict({"warnings": ["stream 'x' has no file"], "validation": {"validation_errors": ["bad"]},
                        "streams": {"cam": {"flags": ["timed by host"], "gaps": [{}, {}]}, "ok": {"flags": []}}})
    assert found["level"] == "warn" and found["reasons"] == ["stream 'x' has no file", "cam: timed by host",
                                                             "cam: 2 gap(s)", "bad"]
    assert qc_verdict({"streams": {"a": {"flags": [], "gaps": []}}}) == {"text": "OK", "level": "pass", "reasons": []}
