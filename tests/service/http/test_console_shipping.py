"""The console's Shipping panel in headless Chromium, against the real daemon and rclone: a copy verified, a
destination that fails with its reason, and the operator's Retry."""
from __future__ import annotations

import shutil

import pytest

from acqd.service.procs import wait_until

from tests.conftest import write_rig
from tests.service.http.test_console import Console, _re, browser, chromium  # noqa: F401 - the browser fixture
from tests.share.shipping import sealed_session, with_ship


class ShipPanel:
    """The Shipping panel of a ``Console`` page."""

    def __init__(self, ui: Console):
        self.ui = ui
        self.panel = ui.page.locator("#shipping-panel")

    def job(self, dest: str):
        return self.panel.locator("#ship-jobs tbody tr", has=self.ui.page.locator(f"td:text-is('{dest}')"))

    def expect_state(self, dest: str, pattern: str) -> None:
        # a copy and its verification: seconds, or a minute on a loaded 2-core machine
        self.ui.expect(self.job(dest).locator(".state")).to_have_text(_re(pattern), timeout=90_000)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (.ci/run installs it)")
def test_operator_sees_a_verified_copy_a_failure_with_its_reason_and_retries(browser, tmp_path, daemon_factory):
    (tmp_path / "empty-rclone.conf").write_text("")
    rig = with_ship(write_rig(tmp_path), [
        {"name": "nas", "remote": str(tmp_path / "nas"), "after": "manual"},
        {"name": "offsite", "remote": "offsite:rig1", "rclone_config": str(tmp_path / "empty-rclone.conf"),
         "after": "manual", "max_attempts": 1}])
    sealed_session(tmp_path / "data", "m1_day3")
    daemon = daemon_factory(rig)
    ui = Console(browser, daemon.url + "/", tmp_path / "screens")
    ship = ShipPanel(ui)
    ui.expect(ship.panel).to_be_visible()
    ui.expect(ui.page.locator("#ship-summary")).to_have_text(_re(r"^\(0 verified, 0 failed"))

    daemon.command("ship", session="m1_day3")  # the operator's `acqd ship m1_day3`
    ship.expect_state("nas", r"^verified \d")
    ui.expect(ship.job("nas").locator("progress")).to_have_attribute("value", _re(r"^[1-9]\d*$"))
    ship.expect_state("offsite", "^failed$")
    ui.expect(ship.job("offsite").locator(".error")).to_have_text(
        "the destination's rclone remote is not in the rclone config (after 1 attempt)")
    ui.expect(ui.page.locator("#ship-summary")).to_have_text(_re(r"^\(1 verified, 1 failed"))
    ship.panel.scroll_into_view_if_needed()
    ui.shot("shipping")

    offsite = lambda: next(j for j in daemon.command("ship_status")["jobs"] if j["dest"] == "offsite")
    failed_at = offsite()["finished"]
    ship.job("offsite").get_by_role("button", name="Retry").click()  # fix the config later; here it fails again
    job = wait_until(lambda: (j := offsite())["state"] == "failed" and j["finished"] != failed_at and j,
                     "the retried job to fail again")
    assert job["attempts"] == 1  # one more attempt, not a storm
    ship.expect_state("offsite", "^failed$")
    ui.expect(ship.job("offsite").get_by_role("button", name="Retry")).to_be_visible()
    assert ui.errors == []
