"""acqd.service.http.serverlimits' registry: who is evicted or refused when a cap is reached (fake connections; the
real server is exercised by tests/faults/test_rows_limits.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from acqd.service.http.serverlimits import Limits, Registry


@dataclass
class FakeTransport:
    closed: str = ""

    def is_closing(self) -> bool:
        return bool(self.closed)

    def close(self) -> None:
        self.closed = "close"

    def abort(self) -> None:
        self.closed = "abort"


@dataclass
class FakeLoop:
    now: float = 0.0

    def time(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeConn:
    client_key: str
    idle_since: float
    loop: FakeLoop
    in_flight: bool = False
    transport: FakeTransport = field(default_factory=FakeTransport)

    def busy(self) -> bool:
        return self.in_flight


def admit_all(reg: Registry, loop: FakeLoop, specs: list[tuple[str, float, bool]]) -> list[FakeConn]:
    conns = []
    for client, since, busy in specs:
        loop.now = since
        c = FakeConn(client, since, loop, busy)
        conns.append(c)
        reg.admit(c)
    return conns


def test_the_longest_idle_connection_of_the_client_makes_room():
    loop, reg = FakeLoop(), Registry(Limits(10, 10, per_client=3, total=100))
    a, b, c = admit_all(reg, loop, [("x", 1, False), ("x", 2, True), ("x", 3, False)])
    (d,) = admit_all(reg, loop, [("x", 4, False)])
    assert a.transport.closed == "close" and not (b.transport.closed or c.transport.closed or d.transport.closed)
    assert reg.count == 3 and reg.closed["evicted idle"] == 1


def test_a_newcomer_is_refused_when_every_other_connection_is_busy_and_other_clients_are_untouched():
    loop, reg = FakeLoop(), Registry(Limits(10, 10, per_client=2, total=100))
    other, a, b = admit_all(reg, loop, [("y", 0, False), ("x", 1, True), ("x", 2, True)])
    (c,) = admit_all(reg, loop, [("x", 3, False)])
    assert c.transport.closed and not (a.transport.closed or b.transport.closed or other.transport.closed)
    assert reg.closed["refused (every connection busy)"] == 1 and reg.count == 3


def test_the_total_cap_evicts_across_clients_and_forget_is_idempotent():
    loop, reg = FakeLoop(), Registry(Limits(10, 10, per_client=10, total=2))
    a, b = admit_all(reg, loop, [("x", 1, False), ("y", 2, False)])
    (c,) = admit_all(reg, loop, [("z", 3, False)])
    assert a.transport.closed and reg.count == 2
    reg.forget(a)  # its connection_lost, after the registry closed it
    assert reg.count == 2 and set(reg.by_client) == {"y", "z"}
