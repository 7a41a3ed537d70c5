"""The probe view in a real browser (issue 28): the real daemon and simulated rig, headless Chromium, a screenshot
per step (``screens/``). The simulated probe has units at known sites and rates, a dead and a noisy site
(acqd.sim.simulate.probe_truth); the page must show them where they are."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from acqd.config import load_config
from acqd.metadata.probes import contact_columns, read_layout
from acqd.config import electrode_columns
from acqd.service.procs import Simulator, wait_until
from acqd.sim.simulate import probe_truth
from tests.conftest import write_rig
from tests.service.http.test_console import Console, _re, browser, chromium  # noqa: F401 - the fixture

PITCH_UM = 20.0
SCREENSHOT_ENV = "ACQD_PROBE_SCREENSHOT"


def _site_y(cfg) -> dict[int, float]:
    s = cfg.stream("probe")
    layout = read_layout(s.probe.file, s.probe.format)
    return {c: layout.y[i] for c, i in contact_columns(layout, electrode_columns(s)).items()}


@pytest.mark.e2e
def test_probe_view_shows_units_dead_and_noisy_sites_and_64_dragged_channels_on_the_session_timebase(
        browser, tmp_path, daemon_factory):
    rig = write_rig(tmp_path)
    cfg = load_config(rig)
    truth, site_y = probe_truth(cfg.stream("probe")), _site_y(cfg)
    daemon = daemon_factory(rig)
    daemon.command("acquire")
    sim = Simulator(rig, 90, seed=6)
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    page = ui.page
    try:
        full = page.locator("#probe-full")
        ui.expect(page.locator("#probe-tiles [data-stream='probe'] svg.probe-map rect.site")).to_have_count(384)
        # Dead and noisy sites outlined, at their sites' positions, and listed.
        (dead,), (noisy,) = truth["dead"], truth["noisy"]
        for cls, ch in (("dead", dead), ("noisy", noisy)):
            site = full.locator(f"svg.probe-map rect.site.{cls}")
            ui.expect(site).to_have_count(1)
            ui.expect(site).to_have_attribute("data-channel", str(ch))
            ui.expect(site).to_have_attribute("data-y", _re(rf"^{site_y[ch]:g}(\.0)?$"))
            ui.expect(full.locator(f".{cls}-list .site-ref")).to_have_attribute("data-channel", str(ch))
        ui.shot("dead-and-noisy-sites")
        # Units: the raster's rate-by-depth profile finds each at its depth (one site pitch) and rate (20 %).
        units = full.locator(".units li.unit")
        ui.expect(units).to_have_count(len(truth["units"]), timeout=60_000)  # once 80 % of the 45 s rates window is in
        seen = sorted((float(u.get_attribute("data-depth")), float(u.get_attribute("data-rate"))) for u in units.all())
        want = sorted((site_y[u["channel"]], u["rate_hz"]) for u in truth["units"])
        for (depth, rate), (y, hz) in zip(seen, want):
            assert abs(depth - y) <= PITCH_UM and rate == pytest.approx(hz, rel=0.2), (seen, want)
        assert int(full.locator("canvas.raster").get_attribute("data-count")) > 50
        ui.shot("units-by-depth")
        # Drag along the shank over more than 64 sites: the first 64 become the trace block.
        box = full.locator("svg.probe-map").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.6, steps=5)
        page.mouse.up()
        ui.expect(full.locator(".selection")).to_have_attribute("data-count", "64")
        ui.expect(full.locator("svg.probe-map rect.site.selected")).to_have_count(64)
        ui.expect(full.locator(".trace-note")).to_have_text(_re(r"^64 channels · ap band"))
        ui.expect(full.locator(".uv-scale")).to_have_text("100 µV")
        ui.expect(full.locator(".uv-scale")).to_have_attribute("data-px", _re(r"^[1-9]\d*(\.\d)?$"))
        shot = ui.shot("64-channels-dragged")
        if os.environ.get(SCREENSHOT_ENV):  # how docs/probe-view.png is made
            shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
        # A note: on the session timebase it falls inside the probe's, the NIDAQ's and the camera's recent windows.
        note = daemon.command("annotate", text="probe check")  # the stored record: its host monotonic time
        ui.expect(page.locator("#annotations li").first).to_contain_text("probe check")
        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            origin = http.get("/api/console/probes/probe").json()["origin_s"]
        t_note = note["monotonic_ns"] / 1e9 - origin

        def windows() -> dict | None:
            # the probe's clock: the end of its latest features (its AP traces show the last analysed segment)
            got = {"probe": full.locator("canvas.raster").get_attribute("data-t1"),
                   "nidaq": page.locator("#previews [data-stream='nidaq'] .plot").get_attribute("data-t1"),
                   "camera": page.locator("#previews [data-stream='camera'] .camera-status").get_attribute("data-t")}
            if all(got.values()) and all(float(v) > t_note + 0.5 for v in got.values()):
                return {k: float(v) for k, v in got.items()}
            return None
        ends = wait_until(windows, "every preview past the note", 20, every_s=0.2)
        assert max(ends.values()) - min(ends.values()) < 1.5, ends  # one clock: their latest times agree
        raster = full.locator("canvas.raster")
        assert float(raster.get_attribute("data-t0")) < t_note < float(raster.get_attribute("data-t1"))
        ui.shot("annotation-on-the-session-timebase")
        # The data stops: the view goes stale, greyed, with its age.
        sim.stop()
        ui.expect(full.locator(".probe-state")).to_have_text(_re(r"^stale: no data for \d+ s"), timeout=15_000)
        ui.expect(page.locator("#probe-tiles article[data-stream='probe']")).to_have_class(_re(r"\bstale\b"))
        ui.shot("stale")
    finally:
        sim.stop()
    assert ui.errors == []
