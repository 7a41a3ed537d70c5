"""A rig of several PCs on one machine: one network namespace per PC, cabled to a switch, each running its own
``acqd serve`` and simulator.

``Network`` makes the namespaces (``acqd-<pid>-<n>-<node>``, unique per test), a ``-sw`` namespace holding a
bridge (the switch), a veth pair from every node to the switch and one from the test's own (root) namespace, so
the test reaches every node's API over the rig network; ``link(node, up)`` pulls and replugs a node's cable at
the switch. ``MultiPC`` runs the nodes: ``start`` writes a node's config (``tests.multipc.rigs``) and starts its
daemon with ``ip netns exec`` (which execs, so the pid is the daemon's), ready once its API answers over the
network; ``simulate`` starts its simulator on the rig's shared sync line; ``kill`` is kill -9 by pid. Teardown
stops every process by its pid and deletes the namespaces and links, whatever failed.

Needs root and ``ip netns`` (and rclone for a rig that gathers): a module's ``pytestmark = multipc_marks()`` skips it
with ``skip_reason()`` otherwise (CI runs as root).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from acqd.client import Client, DaemonUnreachable
from acqd.finalize import unseal_session
from acqd.service.procs import Daemon, Simulator, pid_alive, stop_process, wait_until
from acqd.session import FINALIZED, SESSION_FILE
from tests.multipc.rigs import FOLLOWERS, LEADER, PORT, SEED, Node, node_yaml, sim_args
from tests.sessions import SUBJECT

IP_TIMEOUT_S = 10
_count = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


def skip_reason(ships: bool = False) -> str | None:
    """Why multi-PC tests cannot run here, or None; ``ships``: the followers ship their parts to the leader, with
    rclone (without it they never arrive, and the test would wait out its deadlines)."""
    if ships and shutil.which("rclone") is None:
        return "the followers ship their parts with rclone, which is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "multi-PC tests make network namespaces: they need root (CI runs as root)"
    try:
        ip("netns", "list")
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns` is unavailable: {e}"
    return None


def multipc_marks(ships: bool = False) -> list[pytest.MarkDecorator]:
    """A multi-PC test module's marks: end to end, and skipped with its reason where it cannot run here."""
    why = skip_reason(ships)
    return [pytest.mark.skipif(why is not None, reason=why or ""), pytest.mark.e2e]


def free_subnet() -> str:
    """A 10.x.y.0/24 no route of this machine uses (three octets, e.g. '10.213.7')."""
    used = json.loads(ip("-j", "route", "show", "table", "all").stdout or "[]")
    taken = {str(r.get("dst", "")).rsplit(".", 1)[0] for r in used}
    while (subnet := f"10.{random.randint(200, 254)}.{random.randint(0, 255)}") in taken:
        pass
    return subnet


class Network:
    """Namespaces for ``nodes`` on one switch; addresses ``<subnet>.<1..>``, the test's own ``<subnet>.254``."""

    def __init__(self, nodes: tuple[str, ...]):
        self.tag = f"acqd-{os.getpid()}-{next(_count)}"
        self.nodes, self.subnet = nodes, free_subnet()
        self.ifname = f"mp{random.getrandbits(24):06x}"  # interface names are at most 15 characters
        self.made: list[str] = []

    def ns(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{self.nodes.index(node) + 1}"

    def wrap(self, node: str) -> tuple[str, ...]:
        """The command prefix that runs a program on ``node``."""
        return ("ip", "netns", "exec", self.ns(node))

    def create(self) -> None:
        sweep_stale()
        switch = self.ns("sw")
        for ns in (switch, *map(self.ns, self.nodes)):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            here, there = f"{self.ifname}n{i}", f"{self.ifname}s{i}"
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", here, "netns", self.ns(node))
            ip("-n", self.ns(node), "link", "set", here, "name", "eth0")
            ip("-n", self.ns(node), "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            ip("-n", self.ns(node), "link", "set", "eth0", "up")
            self._to_switch(there)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", f"{self.ifname}s")
        ip("addr", "add", f"{self.subnet}.254/24", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        self._to_switch(f"{self.ifname}s")

    @property
    def host_if(self) -> str:
        return f"{self.ifname}h"

    def _to_switch(self, name: str) -> None:
        switch = self.ns("sw")
        ip("link", "set", name, "netns", switch)
        ip("-n", switch, "link", "set", name, "master", "br0")
        ip("-n", switch, "link", "set", name, "up")

    def link(self, node: str, up: bool) -> None:
        """Plug (``up``) or pull ``node``'s cable at the switch: it reaches neither the other nodes nor the test."""
        ip("-n", self.ns("sw"), "link", "set", f"{self.ifname}s{self.nodes.index(node)}", "up" if up else "down")

    def destroy(self) -> None:
        """Delete every namespace made (their veth ends go with them) and the test's own link; never raises."""
        ip("link", "del", self.host_if, check=False)
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made.clear()


def sweep_stale() -> None:
    """Delete the namespaces of test runs that were killed before their teardown (named ``acqd-<pid>-...`` by a
    process that is gone): a SIGKILLed pytest cannot clean up, the next run does."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) >= 4 and parts[0] == "acqd" and parts[1].isdigit() and not pid_alive(int(parts[1])):
            ip("netns", "del", name, check=False)


@contextmanager
def network(nodes: tuple[str, ...]) -> Iterator[Network]:
    net = Network(nodes)
    try:
        net.create()
        yield net
    finally:
        net.destroy()


class MultiPC:
    """The leader and its followers, each a PC of ``net`` with its own folder under ``root``."""

    def __init__(self, net: Network, root: Path, sim_seconds: float, carries: dict[str, tuple[str, ...]]):
        self.net, self.sim_seconds = net, sim_seconds
        self.nodes = {n: Node(n, net.address(n), f"token-of-{n}-{os.getpid()}", root / n, carries.get(n, ()))
                      for n in net.nodes}
        self.t0 = time.monotonic()  # the sync line's true time 0: one CLOCK_MONOTONIC in every namespace
        self.daemons: dict[str, Daemon] = {}
        self.sims: dict[str, Simulator] = {}
        self.clients: dict[str, Client] = {}

    @property
    def leader(self) -> Node:
        return self.nodes[LEADER]

    @property
    def followers(self) -> tuple[Node, ...]:
        return tuple(self.nodes[n] for n in self.net.nodes if n != LEADER)

    def start(self, name: str, env: dict | None = None, timeout_s: float = 30.0, ship: bool = True) -> Client:
        """Write ``name``'s config (a follower ships its sessions to the leader's data root unless not ``ship``) and
        start its daemon; ready once its API answers over the rig network."""
        node = self.nodes[name]
        if name == LEADER:
            node_yaml(node, followers=self.followers)
        else:
            node_yaml(node, ship_to=self.leader if ship else None)
        self.daemons[name] = Daemon(node.config, node.data_root, node.home, env=env, log=node.home / "daemon.log",
                                    port=PORT,
                                    token=node.token, wrap=self.net.wrap(name))
        if name in self.clients:  # a restarted node
            self.clients[name].close()
        self.clients[name] = client = Client(node.url, node.token, timeout=30.0)
        wait_until(lambda: _answers(client), f"{name}'s API at {node.url}", timeout_s)
        return client

    def simulate(self, name: str) -> Simulator:
        """Start ``name``'s simulated devices on the shared sync line (its daemon acquiring connects them)."""
        node = self.nodes[name]
        self.sims[name] = sim = Simulator(node.config, self.sim_seconds, seed=SEED, truth=node.home / "truth.json",
                                          extra=sim_args(name, self.t0), wrap=self.net.wrap(name))
        return sim

    def acquire(self, name: str, timeout_s: float = 60.0) -> None:
        """``name`` acquiring with its simulator publishing, every stream flowing (RECORD's preflight passes)."""
        client = self.clients[name]
        client.command("acquire")
        self.simulate(name)
        problems: list[str] = []

        def flowing() -> bool:
            problems[:] = client.command("preflight")["problems"]
            return not problems
        try:
            wait_until(flowing, f"{name}'s streams to flow", timeout_s)
        except TimeoutError as e:
            raise TimeoutError(f"{e}: {'; '.join(problems)}") from None

    def start_all(self) -> None:
        """Every node started and acquiring, all at once (each PC starts on its own; on a loaded test machine
        one at a time triples the wait)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for done in [pool.submit(self.start, name) for name in self.nodes]:
                done.result()
            for done in [pool.submit(self.acquire, name) for name in self.nodes]:
                done.result()

    def record(self, session: str) -> Path:
        """RECORD from the leader's API; returns the leader's session folder."""
        status = self.clients[LEADER].command("record", session=session, metadata={"subject": SUBJECT})
        return Path(status["session"]["path"])

    def wait_recorded(self, seconds: float, names: tuple[str, ...] | None = None) -> None:
        """Until every node of ``names`` (default all) has recorded ``seconds`` of its session."""
        clients = [self.clients[n] for n in names or tuple(self.clients)]
        wait_until(lambda: all((c.command("status")["session"] or {}).get("elapsed_s", 0) >= seconds
                               for c in clients), f"{seconds} s recorded", seconds + 30, 0.25)

    def kill(self, name: str) -> None:
        """kill -9 ``name``'s daemon (by its pid) and reap it."""
        daemon = self.daemons.pop(name)
        stop_process(daemon.proc, timeout_s=10, sig=signal.SIGKILL)

    def close(self) -> None:
        """Stop every simulator and daemon by pid: SIGTERM to all at once, then each waited for (SIGKILL after a
        deadline)."""
        procs = [sim.proc for sim in self.sims.values()] + [d.proc for d in self.daemons.values()]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            stop_process(proc, timeout_s=30)
        for client in self.clients.values():
            client.close()


def session_json(folder: Path) -> dict:
    try:
        return json.loads((folder / SESSION_FILE).read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return {}


def wait_finalized(folder: Path, timeout_s: float = 240.0) -> None:
    wait_until(lambda: session_json(folder).get("state") == FINALIZED, f"{folder.name} finalized", timeout_s, 0.5)


def _answers(client: Client) -> bool:
    try:
        client.command("status")
        return True
    except DaemonUnreachable:
        return False


@contextmanager
def multipc(tmp_path: Path, sim_seconds: float, nodes: tuple[str, ...] = (LEADER, *FOLLOWERS),
            carries: dict[str, tuple[str, ...]] | None = None) -> Iterator[MultiPC]:
    """A network of ``nodes`` and their processes (none started yet); everything is torn down on the way out.
    ``carries``: a node that records other nodes' streams too (``Node.carries``)."""
    with ExitStack() as stack:
        net = stack.enter_context(network(nodes))
        rig = MultiPC(net, tmp_path, sim_seconds, carries or {})
        stack.callback(unseal_all, rig)  # after the processes stopped (callbacks run last first)
        stack.callback(rig.close)
        yield rig


def unseal_all(rig: MultiPC) -> None:
    """Finalized sessions are immutable (chattr +i): unseal them so that pytest can delete the test's folder."""
    for node in rig.nodes.values():
        for folder in node.data_root.glob("*/"):
            unseal_session(folder)
