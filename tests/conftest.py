"""Shared fixtures: a rig config on ipc:// endpoints in the test's own folder, and real processes."""

from __future__ import annotations

from tests.bytecode import cache_bytecode

cache_bytecode()  # first: the modules imported below, and every process the tests start, keep their bytecode

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from acqd.config import RigConfig, load_config
from acqd.finalize.seal import unseal_session
from acqd.service import procs
from acqd.service.procs import Daemon, Simulator, wait_until
from acqd.sim.simulate import Rig, SimParams
from tests import zygote
from tests.sessions import SUBJECT

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "rig.yaml"
SIM_SECONDS = 60.0  # the simulator's horizon; it is stopped as soon as a test is done with it


def write_rig(tmp_path: Path, *, flush_interval_s: float = 0.25, stream_overrides: dict | None = None,
              daemon_overrides: dict | None = None) -> Path:
    """The example rig with ipc endpoints under ``tmp_path`` (no port clashes between test runs)."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    (tmp_path / "ipc").mkdir(exist_ok=True)
    overrides = dict(daemon_overrides or {})
    control = {"host": "127.0.0.1", "port": 0, **overrides.pop("control", {})}  # e.g. {"token": ...}
    raw["daemon"].update(data_root=str(tmp_path / "data"), flush_interval_s=flush_interval_s, control=control,
                         **overrides)
    for s in raw["streams"]:
        s["endpoint"] = f"ipc://{tmp_path}/ipc/{s['name']}"
        override = (stream_overrides or {}).get(s["name"], {})
        if s.get("probe"):  # the example's layout file stays beside the example config; it fits only its shape
            s["probe"] = None if "shape" in override else {**s["probe"], "file": str(EXAMPLE.parent / s["probe"]["file"])}
        s.pop("video", None)  # tests read camera frames back from the stream file; video files are opt-in per test
        s.update(override)
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def unsealed_at_the_end(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every file sealed under this run's (this worker's) test folders is unsealed once the tests are done: pytest
    deletes the folders of older runs (it keeps three), and a sealed file (chattr +i) cannot be deleted; left
    sealed, every run kept its sessions on the disk for good."""
    yield
    unseal_session(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session", autouse=True)
def forked_acqd() -> Iterator[None]:
    """Daemons, simulators and the CLI runs of ``tests.zygote.run`` forked from one process per worker that has
    imported acqd once (tests/zygote.py): a third of the suite's CPU was those imports, again at each start."""
    zygote.start()
    procs.popen = zygote.popen
    yield
    procs.popen = subprocess.Popen
    zygote.stop()


UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` (make test), a test marked ``xdist_group`` that pytest-xdist did not tag fails (in
    ``pytest_runtest_setup``, where its reason shows): its group's module-scoped session would be built once per
    worker that draws one of its tests, and the tests a group keeps on one worker would run at once. pytest 9.2 with
    pytest-xdist 3.8 did exactly that, silently (xdist#1386)."""
    if config.getoption("loadgroup", False):
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[UNGROUPED] = ("pytest-xdist's loadgroup did not group this test (xdist#1386): use a "
                                         "pytest it supports (pyproject.toml pins one)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if UNGROUPED in item.stash:
        pytest.fail(item.stash[UNGROUPED], pytrace=False)


@pytest.fixture
def rig_file(tmp_path: Path) -> Path:
    return write_rig(tmp_path)


SMALL_PROBE = {"probe": {"shape": [33], "sync": {"source": "channel", "channel": 32, "bit": 0}}}
"""A 32-channel probe (and its sync word) at the example's 30 kHz, for tests whose subject is not the probe's width
(lifecycle, logs, annotations, finalize and export through the daemon): finalize and export take seconds instead of
a minute. Tests of the real data rate keep the example's 385 channels (``rig_file``)."""

SMALL_RIG = {**SMALL_PROBE, "camera": {"shape": [48, 64]}}
"""``SMALL_PROBE`` and a 48x64 camera, for tests whose subject is neither the probe's width nor the frames' size: the
simulator (and ``rig_for``) draw a 640x480 camera's pool in ~0.3 s of CPU at each start, and its 18 MB/s are
written, hashed and checked for nothing the test looks at."""


def overlay(base: dict, **streams: dict) -> dict:
    """Stream overrides for ``write_rig``: ``base``'s, each of ``streams``' settings merged into that stream's own
    (``overlay(SMALL_RIG, probe={"max_file_seconds": 1})`` keeps the small probe's shape)."""
    return {**base, **{name: {**base.get(name, {}), **o} for name, o in streams.items()}}


@pytest.fixture
def small_rig_file(tmp_path: Path) -> Path:
    return write_rig(tmp_path, stream_overrides=SMALL_PROBE)


@pytest.fixture
def daemon_factory(tmp_path: Path):
    """Start daemons on the test's data root; every one is stopped (or killed) at teardown."""
    started: list[Daemon] = []

    def start(config: Path, env: dict | None = None) -> Daemon:
        d = Daemon(config, tmp_path / "data", tmp_path, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(timeout_s=30)


def assert_bit_exact(f, rig: Rig, stream: str) -> int:
    """Every committed index row of a stream file equals what the simulated device sent; returns rows."""
    index = f["index"][:]
    data = f["data"]
    for row in index:
        a, n = int(row["file_row"]), int(row["n_samples"])
        expected = rig.samples(stream, int(row["first_sample"]), n)
        assert np.array_equal(data[a:a + n], expected), f"{stream}: rows {a}..{a + n} differ from what was sent"
    return int(index["n_samples"].sum()) if len(index) else 0


def messages(stream: dict) -> int:
    """Messages a stream's writer received since ACQUIRE (its status' ``total``)."""
    return (stream.get("total") or {}).get("messages", 0)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@contextmanager
def acquiring(daemon: Daemon, rig_file: Path, seed: int, **sim: object) -> Iterator[Simulator]:
    """ACQUIRE, start the simulated rig, and wait until every stream flows (RECORD's preflight passes); yields the
    simulator, stopped on the way out.

    A stream that received from an earlier simulator must have received from this one too: the preflight passes
    while the earlier one's last message is younger than ``silent_after_s``, and a RECORD a moment later would find
    the stream silent."""
    daemon.command("acquire")
    heard = {n: messages(s) for n, s in daemon.command("status")["streams"].items() if messages(s)}
    started = time.monotonic()
    simulator = Simulator(rig_file, SIM_SECONDS, seed=seed, **sim)

    def new(stream: dict, before: int) -> bool:  # (both: the counts come with stats, which lag)
        return messages(stream) > before and stream["silent_s"] is not None \
            and stream["silent_s"] < time.monotonic() - started

    def flowing() -> bool:
        streams = daemon.command("status")["streams"]
        return all(new(streams[n], m) for n, m in heard.items()) and not daemon.command("preflight")["problems"]

    try:
        wait_until(flowing, "all streams to flow")
        yield simulator
    finally:
        simulator.stop()


@contextmanager
def recording(daemon: Daemon, rig_file: Path, session: str, seed: int, **sim: object) -> Iterator[tuple[dict, Path]]:
    """``acquiring``, then RECORD; yields (status, session folder).

    The simulator is stopped on the way out; the body decides when to stop recording.
    """
    with acquiring(daemon, rig_file, seed, **sim):
        status = daemon.command("record", session=session, metadata={"subject": SUBJECT})
        yield status, Path(status["session"]["path"])


def rig_for(config: Path, seconds: float = SIM_SECONDS, seed: int = 0) -> tuple[RigConfig, Rig]:
    cfg = load_config(config)
    return cfg, Rig(cfg, SimParams(seed=seed, seconds=seconds))
