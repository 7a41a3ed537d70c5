"""Fault-matrix row 45: hostile files and paths through amend, attach and metadata (../shared/fault-matrix.md).

Planted links never carry a write out of the session, image and YAML bombs are refused with one line before they
are decoded, and a ``kill -9`` at any step of an amend leaves a session that verifies (the journal rolls the
amend forward or back). Everything runs through real files, the real CLI in a subprocess, and real signals (the
amend that shows a recovered session amends again calls the CLI's ``amend_session`` in the test's own process: a
CLI run costs ~1 s of CPU to import pynwb, and the CLI's path is proven by the recoveries before it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acqd.errors import SessionError
from acqd.images import attach
from acqd.session import SESSION_FILE, write_json_atomic
from tests import zygote

TIMEOUT_S = 30
CLI = [sys.executable, "-m", "acqd.cli"]


def _cli(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return zygote.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


PEAK_OF = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs a command and writes its peak RSS (kB). Forked from this small launcher, not from the pytest worker: Linux
carries the pre-exec image's high-water mark into a child's ``ru_maxrss``, so a CLI started by a worker that had
grown to 571 MB reported 571 MB whatever it used itself."""


def _cli_peak_mb(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``_cli``, and the peak resident memory (MB) of that CLI process alone."""
    peak = tmp_path / "cli.peak"
    done = subprocess.run([sys.executable, "-c", PEAK_OF, str(peak), *CLI, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    return done, int(peak.read_text()) / 1024


def _one_line_refusal(out: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, one ``acqd: error:`` line naming ``words``, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acqd: error: "), out.stderr
    assert "Traceback" not in out.stderr and all(w in lines[0] for w in words), out.stderr


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (links as their target text) -> sha256: a snapshot to compare."""
    out = {}
    for d, dirs, names in os.walk(folder):
        for n in dirs + names:
            p = Path(d) / n
            key = str(p.relative_to(folder))
            out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else (
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


@pytest.fixture
def closed(tmp_path) -> Path:
    """A closed session folder as attach sees it (session.json with its state and frozen daemon config)."""
    folder = tmp_path / "data" / "S1"
    (folder / "streams").mkdir(parents=True)
    write_json_atomic(folder / SESSION_FILE, {"session_id": "S1", "state": "closed",
                                              "config": {"daemon": {"max_image_pixels": 50_000_000}}})
    return folder


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(path)
    return path


# -- attach: planted links ---------------------------------------------------------------------------------------


def test_row45_attach_through_a_linked_attachments_folder_writes_nothing_outside(closed, photo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (closed / "attachments").symlink_to(outside)
    with pytest.raises(SessionError, match="attachments is not a folder of the session"):
        attach(closed, photo, "a photo")
    assert list(outside.iterdir()) == []


def test_row45_attach_never_creates_the_target_of_a_dangling_link(closed, photo, tmp_path):
    (closed / "attachments").mkdir()
    target = tmp_path / "created-by-attach.png"
    (closed / "attachments" / "x.png").symlink_to(target)
    before = _tree(closed)
    with pytest.raises(SessionError, match="already has an attachment file named x.png"):
        attach(closed, photo, "a photo")
    assert not target.exists() and not target.is_symlink()
    assert _tree(closed) == before


def test_row45_attach_never_overwrites_the_target_of_a_sidecar_link(closed, photo, tmp_path):
    (closed / "attachments").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (closed / "attachments" / "x.png.json").symlink_to(victim)
    before = _tree(closed)
    with pytest.raises(SessionError, match=r"already has an attachment file named x\.png\.json"):
        attach(closed, photo, "a photo")
    assert victim.read_text() == "precious"
    assert _tree(closed) == before  # the image this call wrote first is removed again


def test_row45_attach_still_works_and_refuses_a_second_file_of_the_same_name(closed, photo):
    sidecar = attach(closed, photo, "a photo", who="x")
    assert sidecar["shape"] == [6, 8]
    assert (closed / "attachments" / "x.png").read_bytes() == photo.read_bytes()
    assert json.loads((closed / "attachments" / "x.png.json").read_text())["description"] == "a photo"
    with pytest.raises(SessionError, match="already has an attachment file named x.png"):
        attach(closed, photo, "again")


# -- attach: image bombs -----------------------------------------------------------------------------------------


def _png_bomb(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of ``width`` x ``height`` black pixels, compressed to almost nothing (written a row
    at a time: this process never holds the decoded image either)."""
    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(20_000, 20_000), (12_000, 12_000)], ids=["400MP", "144MP"])
def test_row45_image_bombs_are_refused_with_one_line_before_decoding(closed, tmp_path, width, height):
    bomb = tmp_path / "bomb.png"
    _png_bomb(bomb, width, height)
    assert bomb.stat().st_size < 1 << 20
    out, peak_mb = _cli_peak_mb(tmp_path, "attach", str(closed), str(bomb), "--description", "a bomb")
    _one_line_refusal(out, "bomb.png", f"{width * height}" if width * height > 2 * Image.MAX_IMAGE_PIXELS
                      else f"{width}x{height}", "daemon.max_image_pixels", "refused before decoding")
    assert peak_mb < 400, f"the CLI peaked at {peak_mb:.0f} MB"  # ~150 MB: Python + numpy
    assert not (closed / "attachments").exists()


# -- --metadata YAML ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,words", [
    ("subject: " + "[" * 5000 + "]" * 5000 + "\n", ["deep.yaml:1:", "nested deeper than 16 levels"]),
    ("subject:\n  species: [Mus musculus\n  sex: M\n", ["deep.yaml:3:6", "expected ',' or ']', but got ':'"]),
    ("subject: {sex: M}\n\tlab: x\n", ["deep.yaml:2:1", "found character '\\t' that cannot start any token"]),
    ("a: &x [1, 2]\nb: *x\n", ["deep.yaml:2:4", "alias *x is not accepted"]),
], ids=["deep", "unclosed", "tab", "alias"])
def test_row45_hostile_metadata_yaml_is_one_line_with_line_and_column(closed, tmp_path, text, words):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    before = _tree(closed)
    _one_line_refusal(_cli("amend", str(closed), "--metadata", str(path)), *words)
    assert _tree(closed) == before


def test_row45_a_50_mb_metadata_file_is_refused_at_once(closed, tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.write(b"keywords:\n" + b"  - abcdefghijklmnopqrstuvwxyz\n" * (50 * 1024 * 1024 // 31))
    started = time.monotonic()
    _one_line_refusal(_cli("amend", str(closed), "--metadata", str(path)), "big.yaml", "at most 262144 are accepted")
    assert time.monotonic() - started < 10


# -- kill -9 at every step of an amend of a finalized session ---------------------------------------------------

# (step the amend is killed at, whether it had committed). The steps are acqd.finalize.amend's checkpoints in order.
KILL_STEPS = [("amend_journal", False), ("amend_partial", False), ("amend_commit", True), ("amend_replaced", True),
              ("amend_session", True), ("amend_manifest", True), ("amend_sealed", True)]
RECOVERERS = ("verify", "finalize", "amend")


pytestmark = pytest.mark.xdist_group("rows_amend")  # one xdist worker: the module-scoped session is built once


@pytest.fixture(scope="module")
def finalized(tmp_path_factory) -> Path:
    """A small finalized session (subject sex F), copied by each test."""
    from acqd.finalize import finalize_session
    from acqd.sim.simulate import Rig, SimParams
    from sessions import Recording, record_session, small_config

    cfg = small_config(tmp_path_factory.mktemp("rows-amend") / "data", probe_channels=4)
    folder = record_session(cfg, Rig(cfg, SimParams(seed=5, seconds=20)), "K1", Recording(seconds=3.0))
    assert finalize_session(folder).state == "finalized"
    yield folder
    from acqd.finalize import unseal_session
    unseal_session(folder)


def _sexes(folder: Path) -> tuple[str, str]:
    """The subject's sex in session.json and in the master."""
    import h5py

    with h5py.File(folder / "K1.nwb", "r") as f:
        in_master = f["general/subject/sex"][()].decode()
    return json.loads((folder / SESSION_FILE).read_text())["metadata"]["subject"]["sex"], in_master


def _kill_amend_at(folder: Path, step: str, tmp_path: Path) -> None:
    """Run ``acqd amend --set subject.sex=M`` in a subprocess, SIGKILL it when it reaches ``step``."""
    marker = tmp_path / "paused"
    env = {**os.environ, "ACQD_FINALIZE_PAUSE_AT": step, "ACQD_FINALIZE_PAUSE_MARKER": str(marker)}
    proc = zygote.popen([*CLI, "amend", str(folder), "--set", "subject.sex=M"], env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (marker.exists() and marker.read_text()) and proc.poll() is None:
            assert time.monotonic() < deadline, f"amend never reached {step}"
            time.sleep(0.05)
        assert proc.poll() is None, f"amend ended before {step}: {proc.stderr.read().decode()}"
        os.kill(int(marker.read_text()), 9)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        proc.stderr.close()
    assert proc.returncode == -9


@pytest.mark.parametrize("i", range(len(KILL_STEPS)), ids=[s for s, _ in KILL_STEPS])
def test_row45_kill9_at_every_amend_step_is_rolled_forward_or_back(finalized, tmp_path, i):
    import shutil

    from acqd.finalize import is_immutable, unseal_session, verify_manifest
    from acqd.finalize.amend import amend_session
    from acqd.finalize.journal import JOURNAL

    step, committed = KILL_STEPS[i]
    recoverer = RECOVERERS[i % len(RECOVERERS)]
    folder = tmp_path / "data" / "K1"
    shutil.copytree(finalized, folder, symlinks=True)
    streams = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "streams").glob("*.h5")}
    try:
        assert _sexes(folder) == ("F", "F")
        _kill_amend_at(folder, step, tmp_path)
        assert (folder / JOURNAL).exists()
        if recoverer == "verify":
            out = _cli("verify", str(folder))
            assert out.returncode == 0 and ("completed an amend" if committed else "rolled back") in out.stdout, out
        elif recoverer == "finalize":
            out = _cli("finalize", str(folder))
            assert out.returncode == 0 and "already finalized" in out.stdout + out.stderr, out
        else:
            out = _cli("amend", str(folder), "--set", "protocol=IACUC 7")
            assert out.returncode == 0 and "protocol: None -> 'IACUC 7'" in out.stdout, out
        assert verify_manifest(folder) == []
        assert not (folder / JOURNAL).exists() and not (folder / "K1.nwb.partial").exists()
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
        sex = "M" if committed else "F"
        assert _sexes(folder) == (sex, sex)
        amendments = json.loads((folder / SESSION_FILE).read_text()).get("amendments", [])
        assert [a["what"] for a in amendments][:1] == ([["subject.sex: 'F' -> 'M'"]] if committed else
                                                       ([["protocol: None -> 'IACUC 7'"]] if recoverer == "amend"
                                                        else []))
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "streams").glob("*.h5")} \
            == streams  # the sealed stream files were never touched
        assert is_immutable(folder / "K1.nwb") == is_immutable(folder / "manifest.sha256") \
            == is_immutable(folder / SESSION_FILE)
        # and a later amend works (before the fix every later amend refused)
        assert amend_session(folder, {"subject": {"sex": "U"}}, "test")["what"] == [f"subject.sex: {sex!r} -> 'U'"]
        assert _sexes(folder) == ("U", "U") and verify_manifest(folder) == []
    finally:
        unseal_session(folder)
