"""The multi-PC harness itself: every node is a PC of its own on the rig network, a pulled cable cuts exactly one,
and nothing is left behind (processes, namespaces, links) even when the test fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from acqd.client import DaemonUnreachable
from acqd.service.procs import pid_alive, wait_until
from tests.multipc.netns import ip, multipc, multipc_marks, network

pytestmark = multipc_marks()


def reachable(client) -> bool:
    try:
        client.command("status")
        return True
    except DaemonUnreachable:
        return False


def test_every_node_is_its_own_pc_and_a_pulled_cable_cuts_only_that_one(tmp_path):
    with multipc(tmp_path, sim_seconds=30) as rig:
        clients = {name: rig.start(name, ship=False) for name in rig.nodes}
        for name, client in clients.items():
            status = client.command("status")
            assert status["mode"] == "IDLE", name
        # the leader's namespace reaches a follower's API over the rig network, with the follower's token
        probe = ("import httpx,sys; r = httpx.get(sys.argv[1] + '/api/status', timeout=5, "
                 "headers={'Authorization': 'Bearer ' + sys.argv[2]}); print(r.status_code)")
        f1 = rig.nodes["f1"]
        out = subprocess.run([*rig.net.wrap("lead"), sys.executable, "-c", probe, f1.url, f1.token],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "200", out.stderr
        rig.net.link("f1", up=False)
        clients["f1"]._http.timeout = 1.0  # a pulled cable: connects time out
        assert not reachable(clients["f1"]) and reachable(clients["lead"]) and reachable(clients["f2"])
        rig.net.link("f1", up=True)
        wait_until(lambda: reachable(clients["f1"]), "f1 back on the network", 10)


def test_teardown_kills_every_process_and_deletes_the_namespaces_even_when_the_test_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"):
        with multipc(tmp_path, sim_seconds=30) as rig:
            rig.start("f2", ship=False)
            rig.acquire("f2")
            pids = [rig.daemons["f2"].pid, rig.sims["f2"].proc.pid]
            tag, host_if = rig.net.tag, rig.net.host_if
            raise RuntimeError("the test failed")
    assert not any(pid_alive(p) for p in pids)
    assert tag not in ip("netns", "list").stdout
    assert ip("link", "show", host_if, check=False).returncode != 0


def test_a_network_that_fails_halfway_is_deleted(monkeypatch):
    net_tags = []

    def broken(self):
        net_tags.append(self.tag)
        ip("netns", "add", self.ns("sw"))
        self.made.append(self.ns("sw"))
        raise subprocess.CalledProcessError(2, "ip link add")

    monkeypatch.setattr("tests.multipc.netns.Network.create", broken)
    with pytest.raises(subprocess.CalledProcessError):
        with network(("lead",)):
            pass
    assert net_tags and net_tags[0] not in ip("netns", "list").stdout


def test_namespaces_left_by_a_killed_test_run_are_swept_by_the_next(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone (a test run killed with -9 before its teardown)
    stale = f"acqd-{dead.pid}-0-lead"
    ip("netns", "add", stale)
    try:
        with network(("lead",)) as net:
            listed = ip("netns", "list").stdout
            assert stale not in listed and net.ns("lead") in listed
    finally:
        ip("netns", "del", stale, check=False)
