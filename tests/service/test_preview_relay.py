"""The supervisor relays previews without running its rounds per preview (acqd.service.previews.ROUNDS_S).

A real Supervisor (no writers started) and a real DEALER on its writers' control socket sending previews as a
writer does: every preview reaches the hub, while the rounds (processes, heartbeats, disk, snapshot) run no more
often than the poll's own timeout would run them."""

from __future__ import annotations

import time

import zmq

from acqd.config import load_config
from acqd.record.preview import encode_message
from acqd.service.previews import ROUNDS_S
from acqd.service.supervisor import Supervisor
from tests.conftest import write_rig


def test_previews_are_relayed_each_while_the_rounds_keep_their_own_pace(tmp_path):
    sup = Supervisor(load_config(write_rig(tmp_path)))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"probe")
    dealer.connect(sup.writers.control_endpoint)
    rounds = []
    real = sup.writers.check_processes
    sup.writers.check_processes = lambda *a: (rounds.append(time.monotonic()), real(*a))[1]
    try:
        key, watcher = sup.previews.watch()
        n, got = 60, []
        t0 = time.monotonic()
        for i in range(n):  # one preview per wake-up, as fast as the loop takes them
            dealer.send(encode_message("probe", {"i": i}))
            sup._pump(1.0)
            got += watcher.take()
        elapsed = time.monotonic() - t0
        assert len(got) == n and sup.previews.received == n  # every preview relayed at once
        assert len(rounds) <= elapsed / ROUNDS_S + 2, (len(rounds), elapsed)
        sup._pump(2 * ROUNDS_S)  # nothing comes: the poll's timeout runs the rounds
        assert len(rounds) >= 1 and time.monotonic() - rounds[-1] < ROUNDS_S
        sup.previews.leave(key)
    finally:
        dealer.close(linger=0)
        ctx.destroy(linger=0)
        sup.shutdown()
