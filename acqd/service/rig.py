"""A rig of several PCs: the leader drives its followers through their control API (docs/multi-pc.md).

Every node serves ``GET /api/rig`` (``node_info``: its node name, protocol and config versions, its clock, mode,
session, streams and disk, read from the published snapshot) and records its ``node`` (and the ``leader`` that
started it) in session.json. A leader (a config with ``followers``) holds a ``Rig``, which the control commands
hand the fanned-out ones to (``FANNED_OUT``):

- ``record``: preflight on every follower first (reachable, token, versions, node name, clock offset from the
  follower's reported time and the request's round trip, stream names unique across nodes, not recording
  already, the follower's own preflight), each problem one line naming the node; then the leader's own start,
  then every follower's, in parallel, with the same session id, metadata and ``leader`` block. A follower that
  fails to start stops the ones started, and the leader's session is closed ``aborted`` with the reason.
- ``stop``, ``acquire``, ``set_mode``, ``annotate`` (timed on the leader): the leader's own command, and the same
  request to every follower; a follower that fails is an incident on the leader, never a failed command.
- A watcher thread per follower asks ``GET /api/rig`` every ``WATCH_INTERVAL_S``: the leader's status ``nodes``
  block, and during RECORD an incident when a follower becomes unreachable, comes back, or is not recording the
  session; its first recorded message time goes into the leader's session.json ``nodes`` and ``start_skew_s``.

Followers stay autonomous: nothing here runs on them but their ordinary commands, so a follower keeps recording
when the leader dies and can be stopped directly. Requests are made with ``acqd.client.Client`` (httpx).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import httpx
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

from acqd.client import ApiError, Client, DaemonUnreachable
from acqd.config import Follower, RigConfig
from acqd.config.nodes import NODE_PATTERN
from acqd.errors import SessionError
from acqd.service.disk import free_bytes
from acqd.wire.protocol import VERSION as WIRE_PROTOCOL

Supervisor = Any
"""acqd.service.supervisor.Supervisor, which imports this module (its status carries ``rig_status``)."""

log = logging.getLogger("acqd")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request: the watchers ask every second
RIG_PROTOCOL = 1
"""The leader/follower conversation (``GET /api/rig``, the ``leader`` block of ``record``); bumped when it changes."""
CLOCK_OFFSET_ENV = "ACQD_TEST_CLOCK_OFFSET_S"
"""Tests only: this node reports its clock shifted by this many seconds (a follower whose clock is off)."""
WATCH_INTERVAL_S = 1.0
CLOCK_SAMPLES = 3
CLOCK_WINDOW = 10
"""The watcher's clock offset is the best (shortest round trip) of this many recent exchanges."""
"""Exchanges per follower at preflight; the shortest round trip gives the clock offset."""
COMMAND_TIMEOUT_S = 150.0
"""A follower's command (acquire, record, stop) may take this long: as long as the CLI waits for one."""
FANNED_OUT = frozenset({"record", "stop", "acquire", "set_mode", "annotate"})
"""The commands a leader sends on to its followers."""
RECORD = "RECORD"


class LeaderRef(BaseModel):
    """The ``leader`` block of a follower's ``record`` request, stored as session.json's ``leader``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node: str = Field(pattern=NODE_PATTERN)
    """The leader's node name."""
    session: str
    """The session id on the leader (the same on every node)."""


class RigProblem(SessionError):
    """One line naming a node and what is wrong with it."""


# -- every node ----------------------------------------------------------------------------------------------------


@functools.cache
def config_version() -> str:
    """A digest of the rig config's schema: two nodes whose configs mean different things differ here."""
    schema = json.dumps(RigConfig.model_json_schema(), sort_keys=True)
    return hashlib.sha256(schema.encode()).hexdigest()[:12]


@functools.cache
def test_clock_offset_ns() -> int:
    """``ACQD_TEST_CLOCK_OFFSET_S`` (tests only), read once; 0 when unset."""
    return round(float(os.environ.get(CLOCK_OFFSET_ENV) or 0) * 1e9)


def host_now_ns() -> int:
    """This node's wall clock, as it reports it to a leader."""
    return time.time_ns() + test_clock_offset_ns()


def start_host_ns(mode: str, streams: dict) -> int | None:
    """This node's start: the host time of its first recorded message (any stream), while recording."""
    starts = [s["first_recorded_ns"] for s in streams.values() if s.get("first_recorded_ns")]
    return min(starts) + test_clock_offset_ns() if starts and mode == RECORD else None


def rig_status(sup: Supervisor, streams: dict) -> dict:
    """The status' rig fields: ``node`` and ``start_host_ns`` on every node; a leader adds ``nodes`` and
    ``start_skew_s`` (``Rig.status``). Runs on the supervisor thread (``Supervisor.status``)."""
    own = {"node": sup.cfg.node, "start_host_ns": start_host_ns(sup.mode, streams)}
    return own if sup.rig is None else {**own, **sup.rig.status(own["start_host_ns"], streams)}


def node_info(sup: Supervisor) -> dict:
    """``GET /api/rig``: who this node is and what it is doing, from the published snapshot (any thread)."""
    st = sup.snapshot.status
    session = sup.session
    return {"node": sup.cfg.node, "rig_protocol": RIG_PROTOCOL, "wire_protocol": WIRE_PROTOCOL,
            "config_version": config_version(), "acqd": version("acqd"), "time_ns": host_now_ns(),
            "mode": st["mode"], "session": (st["session"] or {}).get("session_id"),
            "leader": session.get("leader") if session else None, "start_host_ns": st.get("start_host_ns"),
            "streams": st["streams"], "disk": {"free_bytes": st["disk_free_bytes"],
                                               "time_left_s": st.get("disk_time_left_s")}}


# -- the leader ----------------------------------------------------------------------------------------------------


@dataclass
class NodeView:
    """What the leader knows of one follower (written by its watcher thread, read by ``Rig.status``)."""

    reachable: bool | None = None
    """None until first asked."""
    error: str | None = None
    clock_offset_s: float | None = None
    """The follower's clock minus the leader's, from its reported time and the request's round trip: of the last
    ``CLOCK_WINDOW`` exchanges, the one with the shortest round trip (its error is at most half of it)."""
    round_trip_s: float | None = None
    samples: deque = field(default_factory=lambda: deque(maxlen=CLOCK_WINDOW))
    """(offset, round trip) of the last exchanges."""
    info: dict = field(default_factory=dict)
    """Its last ``GET /api/rig`` answer."""
    in_session: str | None = None
    """The leader's session this follower was started in (None: not in one)."""
    start_host_ns: int | None = None
    """Its first recorded message, on its own clock."""
    warned: bool = False
    """An incident says it is not recording the session (raised once per session)."""


class Rig:
    """The leader's side: fan-out of commands, preflight, the followers' watchers and the ``nodes`` status."""

    def __init__(self, sup: Supervisor, url: str | None = None):
        self.sup, self.url = sup, url
        self.followers: tuple[Follower, ...] = sup.cfg.followers
        self.views = {f.name: NodeView() for f in self.followers}
        self.started: tuple[str, ...] = ()
        """The followers started with the leader's last session (its start skew is over them)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(f,), name=f"acqd-rig-{f.name}", daemon=True)
                         for f in self.followers]

    def start(self) -> Rig:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    # -- talking to a follower ----------------------------------------------------------------------------------
    def ask(self, f: Follower, method: str, path: str, body: dict | None = None) -> dict:
        """One request to follower ``f``; every failure is a ``RigProblem`` naming the node. A command may take as
        long as the follower's own (starting writers, closing files); connecting and reads take ``timeout_s``."""
        try:
            token = f.read_token()
        except (OSError, ValueError) as e:
            raise RigProblem(f"node {f.name}: cannot read its token file: {e}") from None
        timeout = httpx.Timeout(COMMAND_TIMEOUT_S if method == "POST" else f.timeout_s, connect=f.timeout_s)
        client = Client(f.url, token, timeout=timeout, operator=f"leader {self.sup.cfg.node}")
        try:
            return client.request(method, path, body)
        except DaemonUnreachable as e:
            raise RigProblem(f"node {f.name}: unreachable at {f.url} ({_first_line(e)})") from None
        except ApiError as e:
            if e.status == 401:
                raise RigProblem(f"node {f.name}: wrong token (refused by {f.url}: give the follower's "
                                 f"control.token)") from None
            if e.status == 404 and path == "/api/rig":
                raise RigProblem(f"node {f.name}: {f.url} speaks no rig protocol (an older acqd?)") from None
            raise RigProblem(f"node {f.name}: {_first_line(e)}") from None
        finally:
            client.close()

    def hello(self, f: Follower) -> tuple[dict, float, float]:
        """``GET /api/rig`` with its clock offset (s) and round trip (s), the offset taken at the round trip's
        midpoint (its error is at most half the round trip)."""
        t0 = time.time_ns()
        info = self.ask(f, "GET", "/api/rig")
        t1 = time.time_ns()
        try:
            return info, (int(info["time_ns"]) - (t0 + t1) // 2) / 1e9, (t1 - t0) / 1e9
        except (KeyError, TypeError, ValueError):
            raise RigProblem(f"node {f.name}: {f.url} answered GET /api/rig without its time (not acqd?)") from None

    def _fan_out(self, fn: Callable[[Follower], Any], followers: tuple[Follower, ...] | None = None
                 ) -> dict[str, Any]:
        """``fn(f)`` for every follower at once; each result, or the RigProblem it raised."""
        followers = self.followers if followers is None else followers
        if not followers:
            return {}

        def one(f: Follower) -> Any:
            try:
                return fn(f)
            except RigProblem as e:
                return e
        with ThreadPoolExecutor(len(followers), thread_name_prefix="acqd-rig") as pool:
            return dict(zip([f.name for f in followers], pool.map(one, followers)))

    # -- preflight and start ------------------------------------------------------------------------------------
    def preflight(self) -> list[str]:
        """Why the rig cannot record now: one line per problem, each naming its node. A follower in IDLE is sent
        ``acquire`` first (as the leader's own RECORD from IDLE acquires), then given the leader's
        ``silent_after_s`` for its streams to deliver."""
        answers = self._fan_out(self._preflight_one)
        problems = [line for a in answers.values() for line in ([str(a)] if isinstance(a, RigProblem) else a[1])]
        owners: dict[str, str] = {s.name: self.sup.cfg.node for s in self.sup.cfg.streams}
        for name, a in answers.items():  # (a daemon answering as another node has one problem already)
            for stream in a[0].get("streams", {}) if isinstance(a, tuple) and a[0].get("node") == name else {}:
                if stream in owners:
                    problems.append(f"node {name}: stream name {stream!r} is also a stream of node {owners[stream]} "
                                    f"(stream names must be unique across the rig)")
                owners.setdefault(stream, name)
        return problems

    def _preflight_one(self, f: Follower) -> tuple[dict, list[str]]:
        """Follower ``f``'s answer and its problems (all of them, each one line naming it)."""
        # NTP's way: of a few exchanges, the one with the shortest round trip bounds the offset best.
        info, offset, rtt = min((self.hello(f) for _ in range(CLOCK_SAMPLES)), key=lambda h: h[2])
        self._seen(f, info, offset, rtt)
        problems = []
        if info.get("node") != f.name:
            problems.append(f"the daemon at {f.url} is node {info.get('node')!r} (its config's node)")
        problems += [f"its acqd {key.replace('_', ' ')} {info.get(key)!r} differs from the leader's {ours!r} (acqd "
                     f"{info.get('acqd')} there, {version('acqd')} here): run the same acqd on every PC"
                     for key, ours in (("rig_protocol", RIG_PROTOCOL), ("wire_protocol", WIRE_PROTOCOL),
                                       ("config_version", config_version())) if info.get(key) != ours]
        if abs(offset) - rtt / 2 > f.max_clock_offset_s:  # surely beyond: the estimate is within half a round trip
            problems.append(f"its clock is {offset:+.3f} s (± {rtt / 2:.3f} s) off the leader's (bound "
                            f"{f.max_clock_offset_s:g} s): synchronise the PCs' clocks (NTP or PTP)")
        if info.get("mode") == RECORD:
            problems.append(f"already recording session {info.get('session')!r}")
        if not problems:
            problems = self._follower_preflight(f, info["mode"])
        return info, [f"node {f.name}: {p}" for p in problems]

    def _follower_preflight(self, f: Follower, mode: str) -> list[str]:
        """The follower's own preflight (acquiring first from IDLE), given the leader's ``silent_after_s`` for its
        streams to deliver."""
        if mode == "IDLE":
            self.ask(f, "POST", "/api/commands/acquire")
        deadline = time.monotonic() + self.sup.cfg.daemon.silent_after_s + 1.0
        while problems := self.ask(f, "POST", "/api/commands/preflight")["problems"]:
            if time.monotonic() > deadline:
                return [f"preflight failed: {'; '.join(problems)}"]
            time.sleep(0.2)
        return []

    def record(self, local: Callable[[], dict]) -> dict:
        """The rig's RECORD: preflight every follower, start the leader (``local``), then every follower."""
        if self.sup.mode == RECORD:
            return local()  # idempotent, as on one PC: the session it has
        if problems := self.preflight():
            raise SessionError("refusing to record: " + "; ".join(problems))
        status = local()
        session = self.sup.session
        if session is None:  # stopped at once (a full disk): nothing to start
            return status
        sid, node = session["session_id"], self.sup.cfg.node
        body = {"session": sid, "metadata": session["metadata"], "leader": {"node": node, "session": sid}}
        started = self._fan_out(lambda f: self.ask(f, "POST", "/api/commands/record", body))
        failed = [str(r) for r in started.values() if isinstance(r, RigProblem)]
        if failed:
            ok = tuple(f for f in self.followers if not isinstance(started[f.name], RigProblem))
            stops = self._fan_out(lambda f: self.ask(f, "POST", "/api/commands/stop"), ok)
            failed += [f"rollback: {r}" for r in stops.values() if isinstance(r, RigProblem)]
            reason = "; ".join(failed)
            self.sup.call(self._abort, sid, reason)
            raise SessionError(f"refusing to record: {reason} (session {sid!r} aborted; the nodes started were "
                               f"stopped)")
        with self._lock:
            for v in self.views.values():
                v.in_session, v.start_host_ns, v.warned = sid, None, False
            self.started = tuple(self.views)
        self.sup.call(self._note_nodes, "recording")
        return {**status, "nodes": self.status(None, status["streams"])["nodes"]}

    def _abort(self, session_id: str, reason: str) -> None:
        """On the supervisor thread: close the leader's session as aborted, with the reason."""
        sup = self.sup
        if sup.mode != RECORD or sup.session is None or sup.session["session_id"] != session_id:
            return
        sup.session.update(aborted=reason, stopped_reason=f"rig start failed: {reason}")
        sup.incident(None, "rig_start_failed", reason, incomplete=True)
        sup.stop_recording()

    # -- the other fanned-out commands --------------------------------------------------------------------------
    def run(self, name: str, body: dict, local: Callable[[], dict]) -> dict:
        """Command ``name`` on the leader (``local``) and on every follower (``body`` is its request)."""
        if name == "record" or (name == "set_mode" and str(body.get("mode", "")).upper() == RECORD):
            return self.record(local)
        if name == "stop" and self.sup.mode == RECORD:  # followers first, so the session records how they stopped
            with self._lock:  # (before: a watcher seeing a stopped follower must not call it astray)
                for v in self.views.values():
                    v.in_session = None
            results = self._fan_out(lambda f: self.ask(f, "POST", "/api/commands/stop", body))
            self.sup.call(self._note_stops, results)
            return {**local(), "nodes_failed": self._incidents(name, results)}
        status = local()
        if name == "annotate":  # the note is timed on the leader; the followers' copies must not delay it
            threading.Thread(target=self._fan_and_report, args=(name, body), daemon=True).start()
            return status
        return {**status, "nodes_failed": self._fan_and_report(name, body)}

    def _fan_and_report(self, name: str, body: dict) -> list[str]:
        return self._incidents(name, self._fan_out(lambda f: self.ask(f, "POST", f"/api/commands/{name}", body)))

    def _incidents(self, name: str, results: dict[str, Any]) -> list[str]:
        failed = [str(r) for r in results.values() if isinstance(r, RigProblem)]
        for line in failed:
            self.sup.post(self.sup.incident, None, "node_command_failed", f"{name}: {line}")
        return failed

    # -- the leader's session.json ------------------------------------------------------------------------------
    def _note_nodes(self, state: str) -> None:
        """On the supervisor thread: session.json ``nodes`` (every node, the leader's own included)."""
        if self.sup.session_record is None:
            return
        nodes = {self.sup.cfg.node: {"url": self.url, "start_host_ns": None, "state": state}}
        nodes.update({f.name: {"url": f.url, "start_host_ns": None, "state": state} for f in self.followers})
        self.sup.session.update(nodes=nodes, start_skew_s=None)
        self.sup.session_record.save()

    def _note_stops(self, results: dict[str, Any]) -> None:
        """On the supervisor thread, still recording: each node's stop (the leader's own follows at once), after
        the starts known by now (a watcher notes them once a second: a session stopped sooner would keep a node's
        start only in the live status)."""
        self._note_starts(save=False)  # saved below, with the stops
        nodes = (self.sup.session or {}).get("nodes") or {}
        if self.sup.cfg.node in nodes:
            nodes[self.sup.cfg.node]["state"] = "stopped"
        for name, r in results.items():
            if name in nodes:
                nodes[name]["state"] = f"stop failed: {r}" if isinstance(r, RigProblem) else "stopped"
        if self.sup.session_record is not None and nodes:
            self.sup.session_record.save()

    def _note_starts(self, save: bool = True) -> None:
        """On the supervisor thread: each node's first recorded message into session.json (saved if it changed and
        ``save``), and the skew."""
        session = self.sup.session
        nodes = (session or {}).get("nodes")
        if not nodes:
            return
        own = start_host_ns(self.sup.mode, {n: h.stats for n, h in self.sup.writers.items()})
        if own is not None and nodes.get(self.sup.cfg.node, {}).get("start_host_ns"):
            own = min(own, nodes[self.sup.cfg.node]["start_host_ns"])
        starts = {self.sup.cfg.node: own, **{n: v.start_host_ns for n, v in self.views.items()}}
        changed = False
        for name, ns in starts.items():  # the earliest seen: a writer restarted later reports its own first message
            old = nodes[name]["start_host_ns"] if name in nodes else None
            if name in nodes and ns is not None and (old is None or ns < old):
                nodes[name]["start_host_ns"], changed = ns, True
        skew = self.skew_s(own)
        if changed or skew != session.get("start_skew_s"):
            session["start_skew_s"] = skew
            if save:
                self.sup.session_record.save()

    def skew_s(self, own_start_ns: int | None) -> float | None:
        """The spread of the nodes' first recorded messages, each on the leader's clock (None until all are in)."""
        with self._lock:
            views = [self.views[name] for name in self.started]
            starts = [v.start_host_ns - round((v.clock_offset_s or 0.0) * 1e9) for v in views
                      if v.start_host_ns is not None]
        if own_start_ns is None or len(starts) < len(views):
            return None
        return round((max([own_start_ns, *starts]) - min([own_start_ns, *starts])) / 1e9, 6)

    # -- the watchers -------------------------------------------------------------------------------------------
    def _watch(self, f: Follower) -> None:
        while not self._stop.is_set():
            try:
                info, offset, rtt = self.hello(f)
            except RigProblem as e:
                self._lost(f, str(e))
            except Exception as e:  # noqa: BLE001 - a garbled answer is a problem of that node, not of the leader
                self._lost(f, f"node {f.name}: bad answer from {f.url}: {e!r}")
            else:
                self._seen(f, info, offset, rtt)
            self.sup.post(self._note_starts)
            self._stop.wait(WATCH_INTERVAL_S)

    def _seen(self, f: Follower, info: dict, offset: float, rtt: float) -> None:
        with self._lock:
            v = self.views[f.name]
            back = v.reachable is False
            v.samples.append((offset, rtt))
            best = min(v.samples, key=lambda s: s[1])
            v.reachable, v.error, v.info = True, None, info
            v.clock_offset_s, v.round_trip_s = round(best[0], 6), round(best[1], 6)
            recording = v.in_session is not None and info.get("mode") == RECORD and info.get("session") == v.in_session
            if recording and info.get("start_host_ns"):
                v.start_host_ns = min(int(info["start_host_ns"]), v.start_host_ns or int(info["start_host_ns"]))
            astray = v.in_session is not None and not recording and not v.warned
            v.warned = v.warned or astray
            session = v.in_session
        self.sup.live.changed = True
        if back and self.sup.mode == RECORD:
            self.sup.post(self.sup.incident, None, "node_reachable", f"node {f.name}: reachable again at {f.url}")
        if astray and self.sup.mode == RECORD:
            self.sup.post(self.sup.incident, None, "node_not_recording",
                          f"node {f.name}: is {info.get('mode')} (session {info.get('session')!r}), not recording "
                          f"session {session!r}", True)

    def _lost(self, f: Follower, problem: str) -> None:
        with self._lock:
            v = self.views[f.name]
            was, v.reachable, v.error = v.reachable, False, problem
        self.sup.live.changed = True
        if was is not False and self.sup.mode == RECORD:
            self.sup.post(self.sup.incident, None, "node_unreachable",
                          f"{problem}; it keeps recording on its own, the leader shows it again when it answers")

    # -- status ---------------------------------------------------------------------------------------------------
    def status(self, own_start_ns: int | None, streams: dict) -> dict:
        """The leader's ``nodes`` block (its own node first) and ``start_skew_s``."""
        own = {"url": self.url, "reachable": True, "clock_offset_s": 0.0, "mode": self.sup.mode,
               "session": (self.sup.session or {}).get("session_id"), "start_host_ns": own_start_ns,
               "disk": {"free_bytes": free_bytes(self.sup.data_root)}, "streams": streams}
        nodes = {self.sup.cfg.node: own}
        with self._lock:
            for f in self.followers:
                v = self.views[f.name]
                nodes[f.name] = {"url": f.url, "reachable": v.reachable, "error": v.error,
                                 "clock_offset_s": v.clock_offset_s, "round_trip_s": v.round_trip_s,
                                 "mode": v.info.get("mode"), "session": v.info.get("session"),
                                 "in_session": v.in_session, "start_host_ns": v.start_host_ns,
                                 "disk": v.info.get("disk"), "streams": v.info.get("streams", {})}
        return {"nodes": nodes, "start_skew_s": self.skew_s(own_start_ns) if self.sup.mode == RECORD else None}


# -- metrics ---------------------------------------------------------------------------------------------------------


class NodeLabelled:
    """A collector whose every sample also carries this node's name (label ``node``): a rig's PCs in one Prometheus
    stay apart."""

    def __init__(self, inner: Any, node: str):
        self.inner, self.node = inner, node

    def collect(self) -> Iterator[Metric]:
        for m in self.inner.collect():
            m.samples = [s._replace(labels={"node": self.node, **s.labels}) for s in m.samples]
            yield m


class NodesCollector:
    """A leader's ``acqd_node_reachable`` and ``acqd_node_clock_offset_seconds`` per node, from its snapshot."""

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        nodes = self.sup.snapshot.status.get("nodes")
        if not nodes:
            return
        reach = GaugeMetricFamily("acqd_node_reachable", "1 while the rig's node answers the leader", labels=["node"])
        offset = GaugeMetricFamily("acqd_node_clock_offset_seconds", "the node's clock minus the leader's",
                                   labels=["node"])
        for name, n in nodes.items():
            reach.add_metric([name], 1.0 if n["reachable"] else 0.0)
            if n["clock_offset_s"] is not None:
                offset.add_metric([name], n["clock_offset_s"])
        yield from (reach, offset)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def start_rig(sup: Supervisor, url: str | None) -> Rig | None:
    """A leader's ``Rig`` (watchers running), or None when the config names no followers."""
    return Rig(sup, url).start() if sup.cfg.followers else None
