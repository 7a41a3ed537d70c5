"""The rig console in a real browser: the real daemon and simulated rig, driven in headless Chromium.

Each test reads as an operator's steps, with one small helper per panel (a page object); every step waits for a
visible state of the page (Playwright's ``expect``), never for a fixed time, and leaves a screenshot under the
test's folder (``screens/``). Outside CI the tests skip, saying why, when Chromium or Playwright is missing;
under ``CI=true`` they fail instead (``.ci/run`` installs Debian's Chromium).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqd.config import load_config
from acqd.service.procs import Simulator, wait_until
from acqd.sim.simulate import probe_truth
from tests.conftest import SMALL_PROBE, write_rig
from tests.sessions import SUBJECT

CHROMIUM = os.environ.get("ACQD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}  # the smallest screen the console is made for
SCREENSHOT_ENV = "ACQD_CONSOLE_SCREENSHOT"
"""Set to a path to keep a screenshot of the console while it records (how docs/console.png is made)."""
STEP_S = 20  # the longest a page state may take to appear (writers starting on a busy 2-core machine)

pytestmark = pytest.mark.xdist_group("console")  # one xdist worker: the module's one Chromium is launched once


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests must run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """One headless Chromium per module (its start costs seconds); each test's pages come from ``browser``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ACQD_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def browser(chromium) -> Iterator[object]:
    """The module's Chromium; every page a test opened (each in a context of its own: ``new_page``) is closed after
    it, so no page of a finished test keeps polling its stopped daemon."""
    yield chromium
    for context in chromium.contexts:
        context.close()


class Console:
    """The console page, one helper per panel; ``shot`` saves a numbered screenshot of the step just done."""

    def __init__(self, browser: object, url: str, screens: Path):
        from playwright.sync_api import expect

        self.expect = expect
        expect.set_options(timeout=STEP_S * 1000)
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(STEP_S * 1000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.screens = screens
        screens.mkdir(exist_ok=True)
        self.step = 0
        self.page.goto(url)

    def shot(self, name: str) -> Path:
        self.step += 1
        path = self.screens / f"{self.step:02d}-{name}.png"
        self.page.screenshot(path=path)
        return path

    # -- overview ------------------------------------------------------------------------------------------
    def expect_mode(self, mode: str, timeout_s: float = STEP_S) -> None:
        self.expect(self.page.locator("#mode")).to_have_text(mode, timeout=timeout_s * 1000)

    def press(self, label: str) -> None:
        self.page.locator("#mode-buttons").get_by_role("button", name=label, exact=True).click()

    def card(self, stream: str):
        return self.page.locator(f"#streams [data-stream='{stream}']")

    def expect_connected(self, streams: list[str]) -> None:
        for s in streams:
            self.expect(self.card(s).locator(".driver")).to_have_text("driver connected")
            self.expect(self.card(s).locator(".problems li")).to_have_count(0)
            self.expect(self.card(s).locator(".load")).to_have_text(_re(r"^ok · flush \d+ ms$"))  # the writer's load
        self.expect(self.page.locator("#verdict")).to_have_text("all streams OK")

    # -- preview -------------------------------------------------------------------------------------------
    def expect_trace_moves(self, stream: str) -> str:
        status = self.page.locator(f"#previews [data-stream='{stream}'] .trace-status")
        self.expect(status).to_have_text(_re(r"t = [\d.]+ s · 4 ch"))
        before = status.inner_text()
        self.expect(status).not_to_have_text(before)  # a newer preview message redrew it
        self.expect(self.page.locator(f"#previews [data-stream='{stream}'] .uplot")).to_be_visible()
        return before

    def expect_thumbnail(self, stream: str) -> None:
        box = self.page.locator(f"#previews [data-stream='{stream}']")
        self.expect(box.locator("img.thumbnail")).to_have_attribute("src", _re("^data:image/jpeg;base64,"))
        self.expect(box.locator(".camera-status")).to_have_text(_re(r"[\d.]+ fps \(nominal 60"))

    # -- record form ---------------------------------------------------------------------------------------
    def fill(self, field: str, value: str) -> None:
        self.page.locator(f"#record-form [name='{field}']").fill(value)

    def field_error(self, field: str):
        return self.page.locator(f"#record-form [data-error-for='{field}']")

    def fill_subject(self, subject: dict) -> None:
        for key in ("subject_id", "species", "age"):
            self.fill(f"subject.{key}", subject[key])
        self.page.locator("#record-form [name='subject.sex']").select_option(subject["sex"])

    def start_recording(self) -> None:
        self.page.locator("#record-button").click()

    # -- annotate ------------------------------------------------------------------------------------------
    def annotate(self, text: str) -> None:
        self.page.locator("#annotation-text").fill(text)
        self.page.locator("#annotate-form button").click()
        self.expect(self.page.locator("#annotations li").first).to_contain_text(text)

    # -- sessions ------------------------------------------------------------------------------------------
    def session_row(self, session: str):
        return self.page.locator(f"#sessions tr[data-session='{session}']")

    def finalize(self, session: str) -> None:
        self.session_row(session).locator("button.finalize").click()

    def qc(self, session: str):
        return self.page.locator(f"#session-detail .qc[data-session='{session}']")


def _re(pattern: str):
    import re

    return re.compile(pattern)


@pytest.mark.e2e
def test_operator_records_annotates_and_finalizes_from_the_console(browser, tmp_path, daemon_factory):
    # The small probe makes finalize and export seconds of work; the docs' screenshot shows the example rig's probe.
    rig = write_rig(tmp_path, stream_overrides=None if os.environ.get(SCREENSHOT_ENV) else SMALL_PROBE)
    daemon = daemon_factory(rig)
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    ui.expect_mode("IDLE")
    ui.shot("idle")

    ui.press("Acquire")
    ui.expect_mode("ACQUIRE")
    ui.expect(ui.card("probe").locator(".problems")).to_contain_text("no driver connected")
    ui.expect(ui.page.locator("#preflight")).to_contain_text("stream 'probe' is silent")  # before any press
    camera = ui.page.locator("#previews [data-stream='camera']")
    ui.expect(camera.locator(".camera-status")).to_have_text("waiting for frames")
    ui.expect(camera.locator("img.thumbnail")).to_be_hidden()  # no broken-image icon before the first frame
    ui.shot("acquiring-no-drivers")
    sim = Simulator(rig, 90, seed=3)  # the rig's drivers start publishing
    try:
        ui.expect_connected(["probe", "nidaq", "camera", "sensor"])
        ui.shot("all-streams-connected")

        ui.expect_trace_moves("probe")
        ui.expect_thumbnail("camera")
        ui.shot("live-preview")

        # The subject starts empty (the config holds none), and says so beside it; one invalid field then:
        # finalize's nwbinspector check says why, beside it.
        ui.expect(ui.page.locator("#f-subject")).to_have_value("")
        ui.expect(ui.page.locator("#last-subject")).to_be_hidden()  # no earlier session: nothing to offer
        ui.fill("session", "console_run")
        ui.expect(ui.field_error("subject.subject_id")).to_have_text("required: the animal of this session")
        ui.fill_subject(SUBJECT)
        ui.fill("subject.age", "ninety days")
        ui.expect(ui.field_error("subject.age")).to_contain_text("does not follow ISO 8601 duration format, e.g. 'P2Y'")
        ui.expect(ui.field_error("subject.age")).to_contain_text("(check_subject_age)")
        ui.expect(ui.page.locator("#preflight li")).to_have_count(0)  # every required stream delivers
        # nwbinspector's three sentences: the first one shows, the rest on demand; nothing overflows the form.
        age_error = ui.field_error("subject.age")
        ui.expect(age_error.locator(".short")).to_have_text(_re(r"for 23 weeks\. \(check_subject_age\)$"))
        ui.expect(age_error.locator("details")).not_to_have_attribute("open", "")
        assert ui.page.evaluate("(f => f.scrollWidth <= f.clientWidth)(document.getElementById('record-form'))")
        ui.shot("invalid-age")
        short_h = age_error.bounding_box()["height"]
        age_error.locator("summary").click()
        ui.expect(age_error.locator("details")).to_have_attribute("open", "")
        ui.expect(age_error.locator("details")).to_contain_text("'P1D/P3D'")
        assert age_error.bounding_box()["height"] > 1.8 * short_h  # what "more" showed had been left out
        assert ui.page.evaluate("(f => f.scrollWidth <= f.clientWidth)(document.getElementById('record-form'))")
        ui.shot("invalid-age-more")
        ui.start_recording()
        ui.expect(ui.field_error("subject.age")).to_contain_text("does not follow ISO 8601 duration format, e.g. 'P2Y'")
        ui.expect(ui.field_error("subject.age")).to_contain_text("(check_subject_age)")
        ui.expect_mode("ACQUIRE")  # refused before anything started
        ui.fill("subject.age", "P90D")
        ui.expect(ui.field_error("subject.age")).to_have_text("")
        ui.start_recording()
        ui.expect_mode("RECORD")
        ui.expect(ui.page.locator("#session-id")).to_have_text("console_run")
        ui.expect(ui.page.locator("#elapsed")).to_have_text(_re(r"recording 0:0[1-9]"))
        ui.shot("recording")

        ui.annotate("drug on")
        ui.expect_trace_moves("probe")
        path = ui.shot("annotated")
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(path, os.environ[SCREENSHOT_ENV])

        # A writer crashes: the feed says so, and its card turns red saying what happened.
        os.kill(daemon.command("status")["streams"]["sensor"]["pid"], signal.SIGKILL)
        # In the feed, not necessarily first: the restarted writer's own gaps (it joins late, then records from its
        # predecessor's last committed message) follow it within a second.
        died = ui.page.locator("#incidents li", has_text=_re(r"writer died sensor .*restarted"))
        ui.expect(died).to_have_count(1)
        ui.expect(ui.card("sensor").locator(".problems")).to_contain_text("writer restarted 1×")
        ui.expect(ui.card("sensor")).to_have_class(_re(r"\bhas-problems\b"))
        ui.expect(ui.card("sensor").locator(".state")).to_have_text("recording")  # into its next part
        ui.shot("writer-restarted")

        ui.press("Stop recording")
        ui.expect_mode("ACQUIRE")
        ui.expect(ui.session_row("console_run").locator(".state")).to_have_text("closed (incomplete)")  # the crash
        ui.shot("stopped")
    finally:
        sim.stop()
    # The drivers are gone: each preview keeps its last picture, marked stale with its age.
    probe_preview = ui.page.locator("#previews [data-stream='probe']")
    ui.expect(probe_preview).to_have_class(_re(r"\bstale\b"))
    ui.expect(probe_preview.locator(".stale-mark")).to_have_text(_re(r"^stale: no data for \d+ s$"))
    ui.shot("stale-previews")

    ui.finalize("console_run")
    ui.expect(ui.session_row("console_run").locator(".job")).to_contain_text("finalize")
    ui.expect(ui.qc("console_run").locator(".qc-verdict")).to_have_text(_re(r"^verdict: \S"), timeout=120_000)
    ui.expect(ui.session_row("console_run").locator(".state")).to_have_text(_re("^finalized"))
    master = tmp_path / "data" / "console_run" / "console_run.nwb"
    ui.expect(ui.qc("console_run").locator(".paths")).to_contain_text(str(master))
    ui.expect(ui.qc("console_run").locator("img.qc-plot")).to_have_count(4)
    ui.qc("console_run").scroll_into_view_if_needed()
    ui.shot("finalized-qc")
    assert master.is_file()

    # Straight on to the export, without reloading the page: the finished job no longer holds the button.
    row = ui.session_row("console_run")
    ui.expect(row.locator(".job")).to_have_text("finalize done")
    ui.expect(row.locator("button.export")).to_be_enabled()
    row.locator("button.export").click()
    ui.expect(row.locator(".state")).to_have_text(_re(r"^exported, (pending|running|verified) \(incomplete\)$"),
                                                  timeout=120_000)  # the crash; the scrub verifies it
    ui.expect(row.locator(".job").last).to_have_text("export done")
    ui.shot("exported")
    assert ui.errors == []


def test_the_api_reference_page_works_without_internet(browser, tmp_path, daemon_factory):
    """/docs draws Swagger UI from the package's own copy: every request the page makes goes to the daemon."""
    daemon = daemon_factory(write_rig(tmp_path))
    page = browser.new_page(viewport=VIEWPORT)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(daemon.url + "/docs")
    from playwright.sync_api import expect

    expect(page.locator(".swagger-ui .info .title")).to_contain_text("acqd control API", timeout=STEP_S * 1000)
    expect(page.locator(".opblock-summary-path", has_text="/api/status").first).to_be_visible()
    page.screenshot(path=tmp_path / "docs.png")
    assert requested and all(u.startswith(daemon.url) or u.startswith("data:") for u in requested), requested


@pytest.mark.e2e
def test_a_token_protected_daemon_asks_for_the_token_first(browser, tmp_path, daemon_factory):
    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"token": "s3cret-token"}}))
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    login = ui.page.locator("#login")
    ui.expect(login).to_be_visible()
    ui.page.locator("#login-token").fill("wrong")
    ui.page.locator("#login-form button").click()
    ui.expect(ui.page.locator("#login-error")).to_have_text("wrong token")
    ui.shot("wrong-token")
    ui.page.locator("#login-token").fill("s3cret-token")
    ui.page.locator("#login-form button").click()
    ui.expect(login).to_be_hidden()
    ui.expect_mode("IDLE")
    ui.expect(ui.card("probe").locator(".state")).to_have_text("stopped")
    ui.shot("signed-in")
    assert ui.errors == []


@pytest.mark.e2e
def test_preview_stream_shows_each_kind_of_stream_decimated_by_its_writer(tmp_path, daemon_factory):
    """No browser: the live preview stream as the page reads it, from the real writers of the simulated rig."""
    import json

    import httpx

    rig = write_rig(tmp_path)
    daemon = daemon_factory(rig)
    daemon.command("acquire")
    sim = Simulator(rig, 60, seed=4)
    seen: dict[str, dict] = {}
    try:
        with httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30.0)) as http:
            assert http.get("/api/console/preview/state").json() == {"watchers": 0, "previewing": [], "received": 0}
            assert http.put("/api/console/preview/probe", json={"channels": [7, 9]}).status_code == 200
            with http.stream("GET", "/api/console/preview") as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        msg = json.loads(line[5:])
                        seen.setdefault(msg["stream"], {}).update(msg)
                    if {"traces", "rms"} <= seen.get("probe", {}).keys() and "thumbnail" in seen.get("camera", {}) \
                            and "last" in seen.get("sensor", {}) and "traces" in seen.get("nidaq", {}):
                        state = http.get("/api/console/preview/state").json()  # while the page still watches
                        break
            assert state["previewing"] == ["camera", "nidaq", "probe", "sensor"] and state["received"] > 0
            # The page went away: the writers are told to stop, and no preview message comes any more.
            wait_until(lambda: http.get("/api/console/preview/state").json()["previewing"] == [], "previews off", 30)
            received = http.get("/api/console/preview/state").json()["received"]
            t0 = http.get("/api/status").json()["time"]  # the daemon's clock: 8 preview periods pass, none arrives
            wait_until(lambda: http.get("/api/status").json()["time"] >= t0 + 2.0, "two more seconds of status")
            after = http.get("/api/console/preview/state").json()
            assert after == {"watchers": 0, "previewing": [], "received": received}
    finally:
        sim.stop()
    probe = seen["probe"]
    assert probe["traces"]["names"] == ["ch007", "ch009"] and len(probe["rms"]) == 385
    (dead,) = probe_truth(load_config(rig).stream("probe"))["dead"]  # the simulated probe's dead site is flat, the others are not
    assert probe["rms"][384] is None and [c for c, v in enumerate(probe["rms"][:384]) if v == 0] == [dead]
    assert probe["rms_scale"] == pytest.approx(1.95e-7) and all(isinstance(v, int) for v in probe["traces"]["y"][0])
    assert seen["nidaq"]["last"]["digital"] == 8 and seen["nidaq"]["traces"]["names"][0] == "ai0"
    assert seen["camera"]["thumbnail"]["src"].startswith("data:image/jpeg;base64,")
    assert seen["sensor"]["last"]["names"] == ["wheel", "lick", "pressure"]
    assert all(m["dropped"] == 0 for m in seen.values())


def test_console_routes_check_the_form_with_the_record_models_and_open_only_the_page(tmp_path, daemon_factory):
    import httpx

    daemon = daemon_factory(write_rig(tmp_path, daemon_overrides={"control": {"token": "t0ken"}}))
    with httpx.Client(base_url=daemon.url, timeout=30.0) as anon:
        page = anon.get("/")
        assert page.status_code == 200 and "acqd console" in page.text
        assert anon.get("/console/js/main.js").status_code == 200
        assert anon.get("/console/vendor/uplot/LICENSE").status_code == 200
        for path in ("/api/console/info", "/api/console/sessions", "/api/console/preview", "/console/../rig.yaml"):
            assert anon.get(path).status_code in (401, 404), path
    with httpx.Client(base_url=daemon.url, timeout=30.0, headers={"Authorization": "Bearer t0ken"}) as http:
        info = http.get("/api/console/info").json()
        assert [s["name"] for s in info["streams"]] == ["probe", "nidaq", "camera", "sensor"]
        assert "subject" not in info["metadata_defaults"] and info["last_metadata"] is None
        bad = http.post("/api/console/validate", json={"session": "../x", "metadata": {
            "subject": {**SUBJECT, "age": "ninety days", "sex": "X"}, "session_description": ""}}).json()
        assert set(bad["errors"]) == {"session", "subject.age", "subject.sex", "session_description"}
        assert "ISO 8601" in bad["errors"]["subject.age"] and "invalid session name" in bad["errors"]["session"]
        empty = http.post("/api/console/validate", json={"metadata": {}}).json()["errors"]
        assert {k: v for k, v in empty.items() if k.startswith("subject")} == {
            **{f"subject.{k}": "required: the animal of this session" for k in ("subject_id", "species", "sex")},
            "subject.age": "Subject is missing age and date_of_birth. Please specify at least one of these fields. "
                           "(check_subject_age)"}
        good = http.post("/api/console/validate", json={"metadata": {"subject": {**SUBJECT, "age": "P12W"}}}).json()
        assert good["errors"] == {} and good["session"]
        assert http.get("/api/console/sessions").json()["sessions"] == []
        assert http.get("/api/console/sessions/nope/qc").status_code == 404
        assert http.put("/api/console/preview/nope", json={"channels": [1]}).status_code == 404
        assert http.put("/api/console/preview/probe", json={"channels": []}).status_code == 422


@pytest.mark.e2e
def test_record_form_starts_without_a_subject_and_offers_the_last_one_as_a_labelled_click(browser, tmp_path,
                                                                                          daemon_factory):
    """Issue 23.2: the form was prefilled with the config's (or the last session's) subject, so the next animal
    was recorded under the last one's id unless the operator noticed. Now it starts empty and says so; the last
    subject is one labelled click away."""
    from acqd.session import SESSION_FILE, write_json_atomic

    last = tmp_path / "data" / "day1"
    last.mkdir(parents=True)
    m12 = {"subject_id": "M12", "species": "Mus musculus", "sex": "M", "age": "P60D", "description": "left V1"}
    write_json_atomic(last / SESSION_FILE, {"session_id": "day1", "state": "closed", "created": "2026-01-01T00:00:00",
                                            "metadata": {"session_description": "day 1", "subject": m12}})
    daemon = daemon_factory(write_rig(tmp_path))
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    ui.expect_mode("IDLE")
    for key in ("subject_id", "species", "sex", "age"):
        ui.expect(ui.page.locator(f"#record-form [name='subject.{key}']")).to_have_value("")
    ui.expect(ui.page.locator("#f-description")).to_have_value("day 1")  # the rest still comes from the last session
    ui.fill("session", "day2")
    for key in ("subject_id", "species", "sex"):
        ui.expect(ui.field_error(f"subject.{key}")).to_have_text("required: the animal of this session")
    button = ui.page.locator("#last-subject")
    ui.expect(button).to_have_text("Same animal as the last session: M12 (Mus musculus, M, P60D)")
    ui.expect(ui.page.locator("#record-form .last-subject .note")).to_contain_text("the animal of this session")
    ui.shot("subject-empty")
    button.click()
    ui.expect(ui.page.locator("#f-subject")).to_have_value("M12")
    ui.expect(ui.page.locator("#f-sex")).to_have_value("M")
    ui.expect(ui.page.locator("#f-age")).to_have_value("P60D")
    for key in ("subject_id", "species", "sex", "age"):
        ui.expect(ui.field_error(f"subject.{key}")).to_have_text("")
    ui.shot("last-subject-chosen")
def test_the_lock_indicator_turns_from_locked_to_not_locked_and_back(browser, tmp_path, daemon_factory):
    """Row 40 in the console: the probe's sync cable is pulled for 8 s, 20 s into the simulation (after its lock)."""
    rig = write_rig(tmp_path, stream_overrides=SMALL_PROBE)
    daemon = daemon_factory(rig)
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    daemon.command("acquire")
    sim = Simulator(rig, 90, seed=5, faults=("sync_off:probe:20:8",))
    try:
        ui.expect_connected(["probe", "nidaq", "camera", "sensor"])
        lock = ui.card("probe").locator(".lock")
        ui.expect(lock).to_have_text("sync –")  # not recording: no lock computed
        wait_until(lambda: not daemon.command("preflight")["problems"], "all streams to flow")
        daemon.command("record", session="lock_run", metadata={"subject": SUBJECT})
        ui.expect(lock).to_have_text(_re(r"^sync locked [+-]\d+\.\d ppm$"), timeout=19_000)
        ui.expect(lock).to_have_class(_re(r"\bok\b"))
        ui.expect(ui.card("probe").locator("svg.drift polyline")).to_have_attribute("points", _re(r"^\S+ \S+"))
        ui.expect(ui.card("camera").locator(".lock")).to_have_text("sync –")  # strobe-timed: no line of its own
        ui.shot("sync-locked")
        ui.expect(lock).to_have_text("sync no edges", timeout=20_000)  # pulled at 20 s: within 10 s
        ui.expect(lock).to_have_class(_re(r"\bbad\b"))
        ui.expect(ui.card("probe")).to_have_class(_re(r"\bhas-problems\b"))
        ui.expect(ui.card("probe").locator(".problems")).to_contain_text("sync no edges: no sync edge for")
        ui.expect(ui.page.locator("#incidents li.kind-sync_lost")).to_contain_text("probe sync no edges")
        ui.expect(ui.card("nidaq").locator(".lock")).to_have_class(_re(r"\bok\b"))
        ui.shot("sync-lost")
        ui.expect(lock).to_have_text(_re(r"^sync locked"), timeout=20_000)  # the edges are back at 28 s
        ui.expect(ui.page.locator("#incidents li.kind-sync_restored")).to_contain_text("probe sync locked again")
        ui.shot("sync-restored")
        daemon.command("stop")
    finally:
        sim.stop()
    assert ui.errors == []


@pytest.mark.e2e
def test_a_leader_shows_every_node_of_the_rig_grouped_with_its_reachability(browser, tmp_path):
    """A real second daemon on loopback is the leader's follower: its streams show under its node's heading, with
    its reachability, clock offset and disk; killed, it shows unreachable."""
    from tests.service.test_rig import TOKEN, follower_entry, node_rig, start_nodes

    with start_nodes() as nodes:
        [follower] = nodes(node_rig(tmp_path, "video", required=False))
        [leader] = nodes(node_rig(tmp_path, "ephys", required=False, followers=[follower_entry("video", follower)]))
        ui = Console(browser, leader.url + "/", tmp_path / "screens")
        ui.page.locator("#login-token").fill(TOKEN)
        ui.page.locator("#login-form button").click()
        ui.expect_mode("IDLE")
        ui.expect(ui.page.locator("#streams-panel h3.node[data-node='ephys']")).to_have_text(
            _re(r"^ephys \(this PC\) · reachable · disk [\d.]+ [kMGT]?B free · IDLE$"))
        video = ui.page.locator("#streams-panel h3.node[data-node='video']")
        ui.expect(video).to_have_text(_re(r"^video · reachable · clock [+-]\d\.\d{3} s · disk [\d.]+ [kMGT]?B free · IDLE$"))
        for stream in ("video_nidaq", "video_sensor"):
            ui.expect(ui.page.locator(f".cards[data-node='video'] [data-stream='{stream}'] .kind")).to_have_text("stopped")
        ui.expect(ui.card("ephys_nidaq")).to_be_visible()
        ui.shot("rig")
        os.kill(follower.pid, signal.SIGKILL)
        ui.expect(video).to_have_text(_re(r"^video · unreachable"))
        ui.expect(video).to_have_class(_re(r"\bbad\b"))
        ui.shot("follower-unreachable")
        assert ui.errors == []
