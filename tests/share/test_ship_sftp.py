"""Shipping over SFTP with the real rclone to a real sshd of the test's own."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from acqd.share.ship import READY, Shipper, rclone
from acqd.share.ship.queue import FAILED, VERIFIED
from tests.share.sftp import SSHD, SftpServer, keygen
from tests.share.shipping import local_destination, sealed_session, tree

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None or not Path(SSHD).exists(),
                                reason="rclone or openssh-server is not installed (.ci/run installs both)")


@pytest.fixture
def sftp(tmp_path):
    server = SftpServer(tmp_path / "sshd")
    server.start()
    yield server
    server.kill()


def test_a_session_ships_over_sftp_and_verifies_there(tmp_path, sftp):
    folder = sealed_session(tmp_path / "data")
    dest = local_destination(tmp_path, name="lab", remote=f"lab:{tmp_path / 'nas'}", rclone_config=sftp.rclone_conf())
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert (job.state, job.error) == (VERIFIED, None)
    shipped = tree(tmp_path / "nas" / folder.name)
    assert READY in shipped
    assert {k: v for k, v in shipped.items() if k != READY} == {
        k: v for k, v in tree(folder).items() if k != "shipping.json"}
    shipper.queue.close()


def test_wrong_credentials_fail_the_job_with_a_clear_error(tmp_path, sftp):
    folder = sealed_session(tmp_path / "data", sizes=(1000,))
    stranger = keygen(tmp_path / "stranger_key")
    dest = local_destination(tmp_path, name="lab", remote=f"lab:{tmp_path / 'nas'}", max_attempts=1,
                             rclone_config=sftp.rclone_conf(stranger), retries=1, low_level_retries=1)
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert job.state == FAILED
    assert job.error in ("wrong credentials for the destination (ssh authentication failed) (after 1 attempt)",
                         "ssh handshake with the destination failed (credentials or host key) (after 1 attempt)")
    assert not (tmp_path / "nas").exists()
    shipper.queue.close()


def test_a_file_that_arrives_corrupt_over_sftp_is_really_sent_again(tmp_path, sftp, monkeypatch):
    """SFTP (no sha256 at the destination: rclone's --checksum falls back to comparing sizes): a file that arrives
    with its size but other bytes must still be re-sent, not skipped as 'same size', and the job then verifies.
    (rclone wrapped by a script that flips a byte of s0.h5 at the destination after the first copy only.)"""
    target = tmp_path / "nas" / "m1_day3" / "streams" / "s0.h5"
    wrapper, once = tmp_path / "rclone-corrupting-once", tmp_path / "corrupted"
    wrapper.write_text(f"""#!/bin/sh
{shutil.which("rclone")} "$@"; rc=$?
case " $* " in *" copy "*) [ -f {target} ] && [ ! -f {once} ] && touch {once} && \\
  printf 'X' | dd of={target} bs=1 seek=10 conv=notrunc 2>/dev/null;; esac
exit $rc
""")
    wrapper.chmod(0o755)
    monkeypatch.setattr(rclone, "RCLONE", str(wrapper))
    folder = sealed_session(tmp_path / "data")
    dest = local_destination(tmp_path, name="lab", remote=f"lab:{tmp_path / 'nas'}", rclone_config=sftp.rclone_conf())
    shipper = Shipper(tmp_path / "data", (dest,))
    job = shipper.run(shipper.ship(folder)[0], dest)
    assert once.exists() and (job.state, job.error) == (VERIFIED, None)
    assert target.read_bytes() == (folder / "streams" / "s0.h5").read_bytes()
    shipper.queue.close()
