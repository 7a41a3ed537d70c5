"""Fault-matrix rows 17, 19 and 20 (/work/shared/fault-matrix.md): hostile names, reachability, DNS rebinding."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import httpx
import pytest

from acqd.config import ControlConfig
from tests.conftest import write_rig

HOSTILE = ["../../etc", "/abs", "a/b", "..", ".", "", "a\x00b", "x" * 300, "-rf", "\u0455ession",
           "a\u2215b", "sess\u200bion", "ＡＢ"]


def _tree(root: Path) -> list[tuple[str, tuple, tuple]]:
    return sorted((d, tuple(sorted(ds)), tuple(sorted(fs))) for d, ds, fs in os.walk(root))


def test_row17_hostile_names_get_422_and_create_nothing(rig_file, daemon_factory, tmp_path):
    daemon = daemon_factory(rig_file)
    before, parent_before = _tree(tmp_path), sorted(os.listdir(tmp_path.parent))
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        for name in HOSTILE:
            r = http.post("/api/commands/record", json={"session": name})
            assert r.status_code == 422 and "invalid session name" in r.json()["error"], (name, r.text)
            if name:  # an empty base_text means "a timestamp"; any other of these makes an invalid name
                r = http.put("/api/recording", json={"base_text": name})
                assert r.status_code == 422, (name, r.text)
            r = http.post("/api/commands/finalize", json={"session": name})
            assert r.status_code in (409, 422), (name, r.text)
        for parent in ("../..", "/", "/etc", str(tmp_path / "data" / ".." / "..")):
            assert http.put("/api/recording", json={"parent_directory": parent}).status_code == 422, parent
        status = http.get("/api/status").json()
    assert status["mode"] == "IDLE" and all(s["pid"] is None for s in status["streams"].values())
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path.parent)) == parent_before


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(f[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append(str(ipaddress.ip_address(packed)))
    return out


def test_row19_the_control_api_is_not_reachable_from_other_hosts(rig_file, daemon_factory):
    daemon = daemon_factory(rig_file)
    addresses = _listening(daemon.pid)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses
    for host in ("0.0.0.0", "::", "10.1.2.3", "127.evil.example"):  # anything else needs a token
        with pytest.raises(ValueError, match="set control.token"):
            ControlConfig(host=host)
    assert ControlConfig(host="0.0.0.0", token="t").token == "t"


def test_row20_dns_rebinding_and_bad_tokens_are_refused_and_change_nothing(tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"token": "s3cret"}}))
    before = _tree(tmp_path / "data")
    good = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        for host in ("evil.example", "evil.example:8600", "127.evil.example", "localhost.evil.example"):
            r = http.post("/api/commands/acquire", json={}, headers={**good, "Host": host})
            assert r.status_code == 421, (host, r.text)
        for auth in (None, "s3cret", "Bearer wrong", "bearer s3cret", "Bearer s3cret x", "Basic czNjcmV0"):
            r = http.post("/api/commands/acquire", json={}, headers={"Authorization": auth} if auth else {})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", auth
            assert http.put("/api/status", json={"mode": "ACQUIRE"},
                            headers={"Authorization": auth} if auth else {}).status_code == 401
        status = http.get("/api/status", headers=good).json()
    assert status["mode"] == "IDLE" and all(s["pid"] is None for s in status["streams"].values())
    assert _tree(tmp_path / "data") == before
