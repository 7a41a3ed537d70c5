"""Sealed sessions and destinations for the shipping tests.

``sealed_session`` writes a session folder as finalize leaves it, through finalize's own code: random stream
files, ``session.json`` in state finalized, and ``manifest.sha256`` by ``seal.write_manifest`` (the session
record's digest included, as at finalize's commit point). The files are not made immutable: shipping reads them
and never needs the flag, and the tests must be able to tamper with them.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from acqd.finalize.seal import Digests, manifest_files, write_manifest
from acqd.session import FINALIZED, SESSION_FILE, json_bytes, write_bytes_atomic
from acqd.config.ship import ShipDestination


def sealed_session(data_root: Path, name: str = "m1_day3", sizes: tuple[int, ...] = (3 << 20, 200_000, 1),
                   seed: int = 0, **record: object) -> Path:
    """``record``: more session.json fields (a follower's part: ``node``, ``leader``)."""
    folder = Path(data_root) / name
    (folder / "streams").mkdir(parents=True)
    rng = __import__("random").Random(seed)
    for i, size in enumerate(sizes):
        (folder / "streams" / f"s{i}.h5").write_bytes(rng.randbytes(size))
    (folder / "qc").mkdir()
    (folder / "qc" / "qc.json").write_text('{"verdict": "PASS"}')
    record = json_bytes({"session_id": name, "state": FINALIZED, "finalized_at": "2026-01-01T00:00:00+00:00",
                         **record})
    with Digests() as digests:
        write_manifest(folder, manifest_files(folder), digests, lambda done, total: None, record)
    write_bytes_atomic(folder / SESSION_FILE, record)
    return folder


def with_ship(rig: Path, ship: list[dict]) -> Path:
    """The rig config file ``rig``, rewritten with these ``ship:`` destinations; returns it."""
    raw = yaml.safe_load(rig.read_text())
    raw["ship"] = ship
    rig.write_text(yaml.safe_dump(raw, sort_keys=False))
    return rig


def local_destination(path: Path, **kw: object) -> ShipDestination:
    settings = {"name": "nas", "remote": str(path), "backoff_s": 0.05, "max_backoff_s": 0.2, **kw}
    return ShipDestination(**settings)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes."""
    return {str(Path(d, n).relative_to(folder)): Path(d, n).read_bytes() for d, _, names in os.walk(folder)
            for n in names}
