"""The control API's front-door rules and the snapshot/event bus, as pure functions (no daemon)."""

from __future__ import annotations

import json

import pytest

from acqd.service.http.guard import MAX_JSON_DEPTH, bearer_ok, host_allowed, host_name, json_depth, media_type_ok
from acqd.service.snapshot import LISTENER_QUEUE, EventBus, Snapshot


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:8600", True), ("localhost:8600", True), ("[::1]:8600", True), ("127.1.2.3", True), ("::1", True),
    ("LOCALHOST.", True), ("rig7.lab:8600", True),
    ("evil.example", False), ("127.evil.example:8600", False), ("localhost.evil.example", False), ("", False),
    (None, False), ("10.0.0.5:8600", False), ("[::ffff:10.0.0.5]:80", False),
])
def test_host_allow_list_takes_loopback_and_configured_names_only(host, ok):
    assert host_allowed(host, ["rig7.lab"]) is ok


def test_host_name_strips_port_and_brackets():
    assert host_name("[::1]:37497") == "::1" and host_name("Rig7.Lab:80") == "rig7.lab" and host_name("::1") == "::1"


@pytest.mark.parametrize("header,ok", [
    ("Bearer s3cret", True), ("s3cret", False), ("bearer s3cret", False), ("Bearer  s3cret", False),
    ("Bearer s3cret ", False), ("Bearer s3cre", False), ("Basic s3cret", False), (None, False), ("", False),
    ("Bearer s3cret,Bearer x", False),
])
def test_bearer_is_parsed_strictly(header, ok):
    assert bearer_ok(header, "s3cret") is ok
    assert bearer_ok(header, None)  # no token configured: anything passes


@pytest.mark.parametrize("method,ctype,body,ok", [
    ("POST", "application/json", b"{}", True), ("POST", "application/json; charset=utf-8", b"{}", True),
    ("POST", "text/plain", b"{}", False), ("POST", "application/x-www-form-urlencoded", b"a=b", False),
    ("POST", None, b"{}", False), ("PUT", None, b'{"mode": "IDLE"}', True), ("PUT", "text/plain", b"{}", False),
    ("POST", None, b"", True),
])
def test_only_json_bodies_and_the_open_ephys_put(method, ctype, body, ok):
    assert media_type_ok(method, ctype, body) is ok


def test_json_depth_ignores_brackets_in_strings_and_needs_no_recursion():
    assert json_depth(b'{"a": [1, {"b": "[[[{{{\\"]]]"}]}') == 3
    deep = b"[" * 100_000 + b"]" * 100_000
    assert json_depth(deep) == 100_000 > MAX_JSON_DEPTH


def test_snapshot_is_read_only_and_encoded_once():
    snap = Snapshot.of(1, {"mode": "IDLE", "streams": {}})
    with pytest.raises(TypeError):
        snap.status["mode"] = "RECORD"  # type: ignore[index]
    assert json.loads(snap.body) == {"mode": "IDLE", "streams": {}}
    copy = snap.to_dict()
    copy["mode"] = "RECORD"
    assert snap.status["mode"] == "IDLE"


def test_a_slow_listener_loses_its_own_oldest_events_counted_and_reconnects_from_an_id():
    bus = EventBus()
    woken = []
    slow = bus.subscribe(lambda: woken.append(1))
    for i in range(LISTENER_QUEUE + 5):
        bus.publish("incident", {"n": i})
    assert slow.dropped == 5 and slow.queue[0].data["n"] == 5 and len(woken) == LISTENER_QUEUE + 5
    again = bus.subscribe(lambda: None, after_id=slow.queue[-2].id)
    assert [e.data["n"] for e in again.queue] == [LISTENER_QUEUE + 4]
    assert b"event: incident\n" in again.queue[0].sse() and again.queue[0].sse().endswith(b"\n\n")
