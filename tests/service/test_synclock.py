"""The live sync lock (acqd.service.synclock) against synthetic edges with known clocks: locked with the true drift,
searching, no edges, a regular train that cannot be paired, a drift beyond the limit; and the alarms it raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from acqd.config import load_config
from acqd.service import synclock
from acqd.service.synclock import (DRIFT, GROUPED_EVERY, KEEP_EDGES, LOCKED, NO_EDGES, NOT_PAIRING, SEARCHING, SyncLock,
                                   Window, judge)
from acqd.sim.devclock import DeviceClock, random_pulse_times, regular_pulse_times
from tests.conftest import write_rig

RATE = 30000.0
LIMITS = dict(edge_timeout_s=5.0, max_drift_ppm=150.0)


def edges(times: np.ndarray, ppm: float = 0.0, offset_s: float = -100.0) -> np.ndarray:
    return DeviceClock(rate=RATE, offset_s=offset_s, ppm=ppm).sample_at(times)


def pulses(seconds: float = 30.0, seed: int = 1) -> np.ndarray:
    return random_pulse_times(np.random.default_rng(seed), 0.2, seconds)


def verdict(dev: np.ndarray, ref: np.ndarray, *, searching: bool = False, dev_silent_s: float = 0.5,
            ref_silent_s: float = 0.5, max_drift_ppm: float = 150.0):
    return judge(dev, RATE, ref, RATE, dev_silent_s=dev_silent_s, ref_silent_s=ref_silent_s, searching=searching,
                 edge_timeout_s=5.0, max_drift_ppm=max_drift_ppm)


def test_locked_reports_the_true_drift_and_offset():
    t = pulses()
    lock = verdict(edges(t, ppm=25.0, offset_s=-100.0), edges(t, ppm=0.0, offset_s=-40.0))
    assert lock.state == LOCKED, lock.reason
    assert lock.paired == lock.edges == len(t)
    assert lock.drift_ppm == pytest.approx(25.0, abs=1.0)
    # The device's counter started 60 s before the reference's (and runs 25 ppm fast): reference - device seconds.
    assert lock.offset_s == pytest.approx(-60.0 - 25e-6 * 130, abs=2e-3)


def test_missing_and_spurious_edges_still_lock():
    t = pulses(seed=2)
    dev = np.sort(np.concatenate([np.delete(edges(t), [3, 9, 17]), edges(np.array([4.321, 11.05]))]))
    lock = verdict(dev, edges(t, ppm=-10.0))
    assert lock.state == LOCKED, lock.reason
    assert lock.paired == len(t) - 3


def test_too_few_edges_is_searching():
    t = pulses(seconds=5.0)
    assert verdict(edges(t), edges(t), searching=True).state == SEARCHING
    assert verdict(edges(t), edges(t), searching=False).state == SEARCHING  # edges coming back after a gap


def test_edges_of_another_line_are_not_pairing():
    other = random_pulse_times(np.random.default_rng(99), 0.2, 30.0)
    lock = verdict(edges(other), edges(pulses()), searching=False)
    assert lock.state == NOT_PAIRING and lock.paired == 0 and lock.reason
    assert verdict(edges(other), edges(pulses()), searching=True).state == SEARCHING


def test_no_edges():
    lock = verdict(np.empty(0, np.int64), edges(pulses()), dev_silent_s=5.2)
    assert lock.state == NO_EDGES and "5 s" in lock.reason


def test_a_regular_train_cannot_be_paired():
    t = regular_pulse_times(0.2, 30.0, 1.0, 3.0)
    lock = verdict(edges(t, ppm=10.0), edges(t))
    assert lock.state == NOT_PAIRING and lock.paired == 0
    assert "not distinctive" in lock.reason


def test_drift_beyond_the_limit_is_measured_not_refused():
    t = pulses(seed=3)
    lock = verdict(edges(t, ppm=400.0), edges(t))
    assert lock.state == DRIFT, lock.reason
    assert lock.drift_ppm == pytest.approx(400.0, abs=5.0)
    assert "150" in lock.reason


def test_a_silent_reference_is_not_pairing():
    t = pulses()
    lock = verdict(edges(t), edges(t), ref_silent_s=6.0)
    assert lock.state == NOT_PAIRING and "reference" in lock.reason


def test_window_drops_repeats_and_restarts_at_a_counter_reset():
    w = Window()
    w.add([100, 200, 200, 300], now=1.0)
    assert [s for _, s in w.edges] == [100, 200, 300]
    w.add([50, 80], now=2.0)  # the device restarted: its counter is back near 0
    assert [s for _, s in w.edges] == [50, 80] and w.resets == 1
    w.add(list(range(100, 100 + KEEP_EDGES)), now=3.0)
    w.prune(oldest=2.5, floor=0.0)
    assert list(w.samples()) == list(range(100, 100 + KEEP_EDGES))  # older than the window: dropped
    w.prune(oldest=10.0, floor=0.0)
    assert len(w.samples()) == KEEP_EDGES  # but the newest KEEP_EDGES stay...
    w.prune(oldest=10.0, floor=3.5)
    assert len(w.samples()) == 0  # ...unless older than the floor


@pytest.fixture
def rig(tmp_path: Path):
    return load_config(write_rig(tmp_path))


def feed_all(lock: SyncLock, t: np.ndarray, now: float, sent: dict, skip: tuple[float, float] = (0.0, 0.0),
             pids: dict | None = None, only: tuple[str, ...] = ("probe", "nidaq", "sensor")) -> None:
    """Stats as the writers send them: each synced stream's edges of the pulses before ``now`` not yet sent (a
    writer that does not report, not in ``only``, loses the pulses meanwhile, as a dead writer does)."""
    for name, ppm in (("probe", 20.0), ("nidaq", 0.0), ("sensor", -15.0)):
        if name not in only:
            sent[name] = now
            continue
        due = t[(t >= sent.get(name, -1.0)) & (t < now) & ~((name == "probe") & (t >= skip[0]) & (t < skip[1]))]
        sent[name] = now
        samples = DeviceClock(rate=lock.rates[name], offset_s=-50.0, ppm=ppm).sample_at(due)
        lock.feed(name, {"sync_edges": samples.tolist(), "pid": (pids or {}).get(name, 1)}, now)


def test_alarm_when_the_cable_is_pulled_and_restored_when_edges_return(rig):
    lock = SyncLock(rig)
    t = pulses(seconds=120.0, seed=4)
    pulled = (40.0, 60.0)
    alarms, states, sent = [], {}, {}
    for k in range(0, 1000):  # every 0.1 s, as the supervisor loop
        now = k * 0.1
        if k % 5 == 0:
            feed_all(lock, t, now, sent, skip=pulled)
        for a in lock.update("s1", now):
            alarms.append((now, *a))
        if lock.status("probe"):
            states.setdefault(lock.status("probe")["state"], now)
    assert lock.status("camera") is None  # strobe-timed: not a synced stream
    assert states[LOCKED] < 15.0
    lost = [a for a in alarms if a[2] == "sync_lost"]
    assert [a[1] for a in lost] == ["probe"] and pulled[0] < lost[0][0] <= pulled[0] + 10.0
    assert "no edges" in lost[0][3]
    back = [a for a in alarms if a[2] == "sync_restored"]
    assert [a[1] for a in back] == ["probe"] and pulled[1] < back[0][0] <= pulled[1] + 5.0
    st = lock.status("probe")
    assert st["state"] == LOCKED and st["drift_ppm"] == pytest.approx(20.0, abs=2.0) and st["drift_history"]
    assert lock.status("nidaq")["state"] == LOCKED and lock.status("sensor")["state"] == LOCKED


def test_a_stream_without_edges_is_no_edges_within_the_timeout(rig):
    lock = SyncLock(rig)
    alarms = []
    for k in range(0, 100):
        now = 1000 + k * 0.1
        if k % 5 == 1:  # the writers report, with no edge
            for name in ("probe", "nidaq", "sensor"):
                lock.feed(name, {"sync_edges": []}, now)
        alarms += [(now, *a) for a in lock.update("s1", now)]
    assert {a[1] for a in alarms} == {"probe", "nidaq", "sensor"}
    assert all(a[0] - 1000 <= 6.0 and "no edges" in a[3] for a in alarms)


def test_a_writer_that_stops_reporting_is_not_a_pulled_cable(rig):
    lock = SyncLock(rig)
    t = pulses(seconds=60.0, seed=6)
    sent, alarms = {}, []
    for k in range(0, 400):
        now = k * 0.1
        if k % 5 == 0 and not 200 <= k < 300:  # every writer silent (SIGSTOP, overload) from 20 to 30 s
            feed_all(lock, t, now, sent)
        alarms += lock.update("s1", now)
    assert alarms == [] and lock.status("probe")["state"] == LOCKED


def test_a_restarted_writer_is_not_a_pulled_cable(rig):
    lock = SyncLock(rig)
    t = pulses(seconds=60.0, seed=7)
    sent, alarms = {}, []
    for k in range(0, 400):
        now = k * 0.1
        if k % 5 == 0 and not 200 <= k < 280:  # the probe's writer dies at 20 s; its successor reports from 28 s
            feed_all(lock, t, now, sent, pids={"probe": 1 if k < 200 else 2})
        elif k % 5 == 0:
            feed_all(lock, t, now, sent, only=("nidaq", "sensor"))
        alarms += lock.update("s1", now)
    assert alarms == [] and lock.status("probe")["state"] == LOCKED


def test_a_late_loop_sheds_the_computation(rig):
    lock = SyncLock(rig)
    lock.update("s1", 10.0)
    lock.update("s1", 10.1)
    assert lock.update("s1", 12.0) == [] and lock.summary()["shed"] and lock.summary()["shed_total"] == 1
    for k in range(1, 12):  # the loop keeps up again
        lock.update("s1", 12.0 + 0.1 * k)
    assert not lock.summary()["shed"] and lock.status("probe")["state"] == SEARCHING


def test_disabled_computes_nothing(tmp_path):
    cfg = load_config(write_rig(tmp_path, daemon_overrides={"sync_lock": {"enabled": False}}))
    lock = SyncLock(cfg)
    for k in range(100):
        assert lock.update("s1", k * 0.1) == []
    assert lock.status("probe") is None and lock.summary()["enabled"] is False


def test_a_writer_sends_at_most_live_edges_max_per_stats_message_and_counts_the_rest(rig):
    from acqd.record.writer import LIVE_EDGES_MAX, Writer

    w = Writer.__new__(Writer)  # only its live-edge bookkeeping: no sockets
    w.live_edges, w.live_edges_cut = [], 0
    w.keep_live_edges(list(range(LIVE_EDGES_MAX - 10)))
    w.keep_live_edges(list(range(1000, 1100)))
    sent = w.take_live_edges()
    assert len(sent["sync_edges"]) == LIVE_EDGES_MAX and sent["sync_edges_cut"] == 90
    assert w.take_live_edges() == {"sync_edges": [], "sync_edges_cut": 0}  # forgotten once sent
    lock = SyncLock(rig)
    lock.update("s1", 0.0)
    lock.feed("probe", sent, 0.05)
    lock.update("s1", 0.1)
    assert lock.status("probe")["edges_cut"] == 90 and lock.status("probe")["edges"] == LIVE_EDGES_MAX


def test_streams_sharing_a_group_writer_are_paired_in_turn_and_each_locks(tmp_path, monkeypatch):
    """Slow streams hosted together (acqd.record.group) are paired every GROUPED_EVERY-th round, a share of them each
    round; a stream of its own is paired every round; each still locks with its true drift."""
    path = write_rig(tmp_path)
    raw = yaml.safe_load(path.read_text())
    sensor = next(s for s in raw["streams"] if s["name"] == "sensor")
    raw["streams"] += [{**sensor, "name": f"slow{i}", "endpoint": f"ipc://{tmp_path}/ipc/slow{i}", "writer_group": "g"}
                       for i in range(8)]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    lock = SyncLock(load_config(path))
    grouped = [f"slow{i}" for i in range(8)]
    assert sorted(lock.phase) == grouped
    judged: list[float] = []
    monkeypatch.setattr(synclock, "judge", lambda dev, rate, *a, **k: judged.append(rate) or judge(dev, rate, *a, **k))
    t = pulses(seconds=120.0, seed=8)
    sent: dict[str, float] = {}
    ppm = {"probe": 20.0, "nidaq": 0.0, "sensor": -15.0, **{n: 3.0 * i for i, n in enumerate(grouped)}}
    for k in range(0, 900):  # every 0.1 s, as the supervisor loop
        now = k * 0.1
        if k % 5 == 0:
            for name, p in ppm.items():
                due = t[(t >= sent.get(name, -1.0)) & (t < now)]
                sent[name] = now
                samples = DeviceClock(rate=lock.rates[name], offset_s=-50.0, ppm=p).sample_at(due)
                lock.feed(name, {"sync_edges": samples.tolist(), "pid": 1}, now)
        judged.clear()
        rounds = lock.rounds
        assert lock.update("s1", now) == []
        if k >= 400 and lock.rounds > rounds:  # a pairing round, once every stream has been judged
            assert len(judged) == 2 + len(grouped) // GROUPED_EVERY  # probe and sensor, and a share of the group
    for name, p in ppm.items():
        if name != "nidaq":
            tol = 2.0 if lock.rates[name] == RATE else 10.0  # a 1 kHz stream latches to 1 ms: ~6 ppm over 30 s
            assert lock.status(name)["state"] == LOCKED and lock.status(name)["drift_ppm"] == pytest.approx(p, abs=tol)
