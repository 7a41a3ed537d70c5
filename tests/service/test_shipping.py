"""Shipping through the daemon: the ship commands over HTTP and the CLI, the events, the metrics, the webhook
and delete_after, with the real rclone to a local folder."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from acqd.client import ApiError
from acqd.service.procs import wait_until
from tests import zygote
from tests.conftest import write_rig
from tests.share.shipping import sealed_session, with_ship

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (.ci/run installs it)")


class Hook(BaseHTTPRequestHandler):
    """The lab's pipeline: takes a POST on the second try (the first gets a 503)."""

    bodies: list[dict] = []
    calls = [0]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.calls[0] += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = 503 if self.calls[0] == 1 else 200
        if status == 200:
            self.bodies.append(body)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook():
    server = HTTPServer(("127.0.0.1", 0), Hook)
    Hook.bodies, Hook.calls = [], [0]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/acqd", Hook.bodies
    server.shutdown()


def test_acqd_ship_verifies_posts_the_webhook_counts_it_and_frees_the_rig(tmp_path, daemon_factory, hook):
    url, posted = hook
    rig = with_ship(write_rig(tmp_path), [{"name": "nas", "remote": str(tmp_path / "nas"), "after": "manual",
                                 "webhook": {"url": url, "retries": 3},
                                 "delete_after": {"verified_copies": 1, "min_age_days": 0}}])
    folder = sealed_session(tmp_path / "data", "m1_day3")
    daemon = daemon_factory(rig)
    env = {**os.environ, "ACQD_URL": daemon.url}
    cli = lambda *a: zygote.run([sys.executable, "-m", "acqd.cli", "ship", *a], capture_output=True, text=True,
                                timeout=60, env=env)
    seen: list[tuple[str, dict]] = []
    with httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30, read=30)) as http:
        with http.stream("GET", "/api/events") as resp:
            out = cli("m1_day3", "--to", "nas")
            assert out.returncode == 0, out.stderr
            assert "m1_day3" in out.stdout and "-> nas" in out.stdout
            kind, deadline = None, time.monotonic() + 90  # a loaded 2-core machine: a minute
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind and kind.startswith("ship"):
                    seen.append((kind, json.loads(line[6:])))
                    if kind == "ship_deleted":
                        break
                assert time.monotonic() < deadline, f"no shipped and ship_deleted events; saw {seen}"
    kinds = [k for k, _ in seen if k != "ship_progress"]
    assert kinds[0] == "ship_queued" and "shipped" in kinds and kinds[-1] == "ship_deleted"
    shipped = next(d for k, d in seen if k == "shipped")
    assert (shipped["session"], shipped["destination"], shipped["path"]) == ("m1_day3", "nas",
                                                                             str(tmp_path / "nas" / "m1_day3"))
    assert not folder.exists()  # delete_after: verified at nas, older than 0 days
    assert "verified at nas" in (tmp_path / "data" / ".acqd-ship-deleted.jsonl").read_text()
    assert (tmp_path / "nas" / "m1_day3" / "READY.json").exists()
    wait_until(lambda: posted, "the webhook to be taken (after a 503)")
    assert (posted[0]["session"], posted[0]["destination"], posted[0]["manifest_sha256"]) == (
        "m1_day3", "nas", shipped["manifest_sha256"])
    out = cli("--status")
    assert out.returncode == 0 and "verified" in out.stdout and "1 verified, 0 failed" in out.stdout
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert 'acqd_ship_verified_total{node="main"} 1.0' in metrics and 'acqd_ship_queued_bytes{node="main"} 0.0' in metrics


def test_ship_commands_refuse_what_they_cannot_do_with_one_line(tmp_path, daemon_factory):
    rig = with_ship(write_rig(tmp_path), [{"name": "nas", "remote": str(tmp_path / "nas"), "after": "manual"}])
    daemon = daemon_factory(rig)
    for body, message in (({"session": "nosuch"}, "no session 'nosuch'"),
                          ({"session": "../etc"}, "invalid session name"),
                          ({"session": "m1", "to": "elsewhere"}, "no ship destination 'elsewhere'")):
        if body["session"] == "m1" and not (tmp_path / "data" / "m1").exists():
            sealed_session(tmp_path / "data", "m1", sizes=(10,))
        with pytest.raises(ApiError) as e:
            daemon.command("ship", **body)
        assert message in str(e.value) and e.value.status in (409, 422)
    with pytest.raises(ApiError, match="no ship job 99"):
        daemon.command("ship_retry", id=99)
    out = zygote.run([sys.executable, "-m", "acqd.cli", "ship", "nosuch"], capture_output=True, text=True,
                     timeout=60, env={**os.environ, "ACQD_URL": daemon.url})
    assert out.returncode == 2 and out.stderr.strip() == f"acqd: error: no session 'nosuch' under {tmp_path / 'data'}"
