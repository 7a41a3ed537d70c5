"""What acqd's processes import at start: what they serve with, not what finalize writes with (issue 23, item 5).

Every test that starts a daemon, and every real start, paid ~0.25 s of CPU (a third of the start) importing pynwb,
hdmf, pandas and scipy (and their thousand modules) that a daemon only needs when it checks session metadata with
nwbinspector (RECORD, the console's form) or amends a session; finalize and export run in their own processes. The
real entry point is run with ``-X importtime`` (``PYTHONPROFILEIMPORTTIME``), whose log names every module the process imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import httpx

from acqd.service.procs import Daemon, wait_until
from tests.sessions import SUBJECT

NWB_STACK = {"pynwb", "hdmf", "pandas", "scipy", "nwbinspector"}


def imported(log: Path | str) -> set[str]:
    """The top-level packages an ``-X importtime`` log (a process's stderr, or its file) says were imported."""
    text = log.read_text(errors="replace") if isinstance(log, Path) else log
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in text.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_the_daemon_serves_without_the_nwb_stack_and_loads_it_when_it_starts_acquiring(tmp_path, small_rig_file):
    log = tmp_path / "daemon.log"
    daemon = Daemon(small_rig_file, tmp_path / "data", tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}, log=log)
    try:
        assert daemon.command("status")["mode"] == "IDLE"
        assert {"fastapi", "uvicorn", "zmq"} <= imported(log)  # the log is the daemon's: it names what serves
        assert not imported(log) & NWB_STACK, "acqd serve imports the NWB stack at start"
        # ACQUIRE loads it on a thread of its own (acqd.service.preload), before any RECORD: the first metadata
        # check would otherwise import it on the supervisor's thread, which then reads no writer report meanwhile.
        daemon.command("acquire")
        wait_until(lambda: {"pynwb", "nwbinspector"} <= imported(log), "ACQUIRE to load pynwb and nwbinspector")
        no_age = {"subject": {k: v for k, v in SUBJECT.items() if k != "age"}}
        with httpx.Client(base_url=daemon.url, timeout=60.0) as http:
            errors = http.post("/api/console/validate", json={"metadata": no_age}).json()["errors"]
        assert errors["subject.age"].endswith("(check_subject_age)"), errors  # nwbinspector's verdict
    finally:
        daemon.stop(timeout_s=30)


CHECK_FROM_THREADS = """
import threading
from acqd.errors import MetadataError
from acqd.finalize.amend import check_metadata
from acqd.service.preload import preload_nwb
from tests.sessions import SUBJECT

meta = {"subject": {**SUBJECT, "species": "mouse"}, "session_description": "threads"}
verdicts = []

def check():
    try:
        check_metadata(meta, "s1")
    except MetadataError as e:
        verdicts.append(sorted(p["check"] for p in e.problems))

preload_nwb()
threads = [threading.Thread(target=check) for _ in range(3)]
[t.start() for t in threads]
[t.join(120) for t in threads]
print(verdicts)
"""


def test_the_nwb_stack_imports_from_several_threads_at_once():
    """The preload thread and the first metadata checks (RECORD on the supervisor's thread, the console's form on the
    server's) may import the stack at the same time: each gets the same verdict."""
    run = subprocess.run([sys.executable, "-c", CHECK_FROM_THREADS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert ast.literal_eval(run.stdout) == [["check_subject_species_form"]] * 3, run.stdout


def test_a_writer_starts_without_asyncio():
    """pyzmq's socket-monitor helper and its ZAP authenticator import asyncio and ssl (~15 ms of CPU in each of the
    ~370 writers of a test run); a writer reads its monitor with ``acqd.wire.monitor`` and loads the authenticator
    only when it binds on tcp (the row 27 tests in tests/faults/test_rows_wire.py run those)."""
    code = ("import sys, acqd.record.launch, acqd.record.writer, acqd.record.group; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = set(ast.literal_eval(run.stdout))
    assert {"zmq", "h5py", "numpy"} <= loaded and not loaded & {"asyncio", "ssl"}, loaded & {"asyncio", "ssl"}


def test_the_cli_parses_its_arguments_before_importing_the_config_models():
    """``acqd --help``, and every command's usage errors, answered in 0.04 s of CPU instead of 0.30: the CLI imports
    the config (pydantic, numpy, yaml) and metadata models only in the commands that read a config or metadata."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "acqd.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "simulate" in run.stdout, run.stderr[-2000:]
    assert "argparse" in imported(run.stderr) and not imported(run.stderr) & {"pydantic", "numpy", "yaml"}


def test_the_processes_a_test_starts_keep_their_bytecode():
    """Under ``PYTHONDONTWRITEBYTECODE`` every daemon, writer and CLI run compiled acqd from source again
    (tests/bytecode.py): a process started by a test finds acqd's bytecode cached, and may cache more."""
    code = ("import importlib.util, os, sys, acqd.errors; "
            "print(sys.dont_write_bytecode, os.path.isfile(importlib.util.cache_from_source(acqd.errors.__file__)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["False", "True"], run.stdout + run.stderr


RACE = """
import sys, threading, time
errors = []

def preload():  # as acqd.service.preload does at ACQUIRE
    try:
        __import__("nwbinspector")
    except BaseException as e:
        errors.append(repr(e))

t = threading.Thread(target=preload)
t.start()
while "nwbinspector" not in sys.modules:  # the package's import has begun on the other thread
    time.sleep(0.0002)
from acqd.metadata.probes import allen_ccf_terms, is_mouse
ok = "VISp" in allen_ccf_terms() and is_mouse("Mus musculus")
t.join()
print(ok, errors)
"""


def test_a_metadata_check_while_acquire_loads_nwbinspector_waits_for_it_instead_of_deadlocking_with_it():
    """A console metadata check during ACQUIRE's preload imported nwbinspector's submodules on its own thread while
    the preload thread was still importing the package: Python's import locks deadlocked, the preload failed and
    the check answered 500 (KeyError: 'nwbinspector'; seen in a full `make test`, reproduced here every time)."""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "True []", out.stdout + out.stderr[-2000:]


SLOW_SHIP_QUEUE = """import sys, time
import acqd.service.daemon as daemon
opens = daemon.start_shipping
daemon.start_shipping = lambda sup: (time.sleep(2.0), opens(sup))[1]  # a ship queue slow to open (a loaded disk)
from acqd.cli import main
sys.exit(main(sys.argv[4:]))  # argv: -c, python, -m, acqd.cli, serve ...
"""


def test_ready_means_the_ship_queue_is_open(tmp_path, small_rig_file):
    """Two make tests at once: a `ship` sent as soon as the daemon was ready was refused, "no ship destinations in
    the rig config", because the ship queue (and a leader's watch of its followers) started after READY."""
    from tests.share.shipping import sealed_session, with_ship

    rig = with_ship(small_rig_file, [{"name": "nas", "remote": str(tmp_path / "nas"), "after": "manual"}])
    sealed_session(tmp_path / "data", "m1_day3")
    daemon = Daemon(rig, tmp_path / "data", tmp_path, wrap=(sys.executable, "-c", SLOW_SHIP_QUEUE))
    try:
        [job] = daemon.command("ship", session="m1_day3")["jobs"]
        assert (job["session"], job["dest"]) == ("m1_day3", "nas"), job
    finally:
        daemon.stop(timeout_s=30)
