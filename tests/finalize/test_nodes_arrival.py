"""A node's part that is still being copied (every file the manifest lists already there, but not complete, and
no READY.json yet) has not arrived: the leader's finalize must not take it mid-copy and leave it out as
"contents changed". Found by tests/multipc/test_rig_e2e.py: rclone (1.60, local backend) creates each file under
its final name and fills it, so "every listed file is there" came true while the stream files were half written;
and again with two test suites at once, where the copy stalled for longer than a poll mid-file and "unchanged
from one poll to the next" came true too.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acqd.finalize.layout import MANIFEST, NODES_DIR
from acqd.finalize.nodes import wait_for_nodes

SESSION = {"session_id": "s", "node": "lead", "nodes": {"lead": {}, "f1": {}}}
CHUNK, CHUNKS = b"x" * 65536, 40
DIGEST = hashlib.sha256(CHUNK * CHUNKS).hexdigest()


def wait_during_copy(tmp_path: Path, first: bytes, rest: Callable[[Path], None]) -> tuple[dict, Path]:
    """Node f1's part with its manifest and its one stream file holding ``first`` (a copy has started: the file
    exists under its final name), ``rest(file)`` copying the rest on a thread while the leader waits. Asserts that
    the part arrived and its file was complete when ``wait_for_nodes`` said so; returns the digests it took and
    the file."""
    part = tmp_path / NODES_DIR / "f1"
    (part / "streams").mkdir(parents=True)
    (part / MANIFEST).write_text(f"{DIGEST}  streams/f1_daq.h5\n")
    target = part / "streams" / "f1_daq.h5"
    target.write_bytes(first)
    copier = threading.Thread(target=rest, args=(target,))
    copier.start()
    try:
        missing, taken = wait_for_nodes(tmp_path, SESSION, timeout_s=30)
        complete = hashlib.sha256(target.read_bytes()).hexdigest() == DIGEST
    finally:
        copier.join()
    assert missing == {} and complete, "finalize took the part before its copy was complete"
    return taken, target


def test_a_part_whose_listed_files_are_still_growing_has_not_arrived(tmp_path):
    def rest(target: Path) -> None:  # the file arrives over ~2 s, as a copy over a slow link would
        with open(target, "ab") as f:
            for _ in range(CHUNKS):
                f.write(CHUNK)
                f.flush()
                time.sleep(0.05)

    wait_during_copy(tmp_path, b"", rest)


@pytest.mark.parametrize("timeout_s", [30, 0])
def test_a_complete_part_without_ready_json_arrives_within_a_few_polls(tmp_path, timeout_s):
    # (a shared mount: nothing writes READY.json); with no time to wait, it is still looked at twice
    part = tmp_path / NODES_DIR / "f1"
    part.mkdir(parents=True)
    (part / "a.h5").write_bytes(CHUNK)
    (part / MANIFEST).write_text(f"{hashlib.sha256(CHUNK).hexdigest()}  a.h5\n")
    started = time.monotonic()
    assert wait_for_nodes(tmp_path, SESSION, timeout_s=timeout_s)[0] == {}
    assert time.monotonic() - started < 5


def test_a_copy_that_stalls_mid_file_for_longer_than_a_poll_has_not_arrived(tmp_path):
    """Half the file, then nothing for 2.5 s (two polls see the same size and times), then the rest: the part
    arrives only once its file hashes to the manifest, and the digest taken then is handed on (not read again)."""
    def rest(target: Path) -> None:
        time.sleep(2.5)
        with open(target, "ab") as f:
            f.write(CHUNK * (CHUNKS - CHUNKS // 2))

    taken, target = wait_during_copy(tmp_path, CHUNK * (CHUNKS // 2), rest)
    assert taken[target][0] == DIGEST
