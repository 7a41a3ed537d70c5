"""Freeing the rig: which local sessions ``delete_after`` lets go, only after proof, and deleting them.

``verdict`` is the pure rule. A session is deleted only if it is finalized (never one recording, finalizing or
never sealed), its manifest is there, and for some destination's ``delete_after``: that destination and at least
``verified_copies`` destinations in all hold a verified copy of *this* manifest (shipping.json, whose entries name
the manifest's sha256, and the queue agree), the session is at least ``min_age_days`` old (its manifest's mtime:
the seal), and, if set, the data root's free space is below ``free_below_bytes``. Every deletion is logged with
what proved it and appended to ``<data root>/.acqd-ship-deleted.jsonl``; ``dry_run`` only says what would go.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from acqd.finalize.layout import MANIFEST
from acqd.finalize.seal import unseal_session
from acqd.session import FINALIZED, SESSION_FILE
from acqd.share.ship.verify import manifest_sha256, shipped_copies
from acqd.config.ship import ShipDestination

log = logging.getLogger("acqd")
DELETED_LOG = ".acqd-ship-deleted.jsonl"
DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class Verdict:
    session: str
    delete: bool
    reason: str
    dry_run: bool = False
    """The policy that allows the deletion only reports it."""


def verdict(session: str, state: str | None, digest: str | None, copies: list[dict], verified_in_queue: set[str],
            sealed_at: float | None, dests: list[ShipDestination], now: float, free_bytes: int,
            shipping_to: frozenset[str] = frozenset()) -> Verdict:
    """Whether ``session`` may be deleted now, and why (or why not); ``shipping_to``: destinations with a job of
    this session still queued, copying or verifying (never deleted under rclone's feet)."""
    policies = [d for d in dests if d.delete_after is not None]
    if not policies:
        return Verdict(session, False, "no destination has delete_after")
    if shipping_to:
        return Verdict(session, False, f"still shipping to {', '.join(sorted(shipping_to))}")
    if state != FINALIZED:
        return Verdict(session, False, f"session is {state}, not finalized")
    if digest is None or sealed_at is None:
        return Verdict(session, False, "no manifest: not sealed")
    proven = sorted(c["destination"] for c in copies
                    if c.get("manifest_sha256") == digest and c.get("destination") in verified_in_queue)
    age_d = (now - sealed_at) / DAY_S
    why_not = []
    for d in policies:
        rule = d.delete_after
        if d.name not in proven:
            why_not.append(f"{d.name}: not verified there")
        elif len(proven) < rule.verified_copies:
            why_not.append(f"{d.name}: {len(proven)} of {rule.verified_copies} verified copies")
        elif age_d < rule.min_age_days:
            why_not.append(f"{d.name}: {age_d:.1f} of {rule.min_age_days:g} days old")
        elif rule.free_below_bytes is not None and free_bytes >= rule.free_below_bytes:
            why_not.append(f"{d.name}: free space {free_bytes / 1e9:.1f} GB is not below "
                           f"{rule.free_below_bytes / 1e9:.1f} GB")
        else:
            return Verdict(session, True, f"verified at {', '.join(proven)} (manifest sha256 {digest[:12]}...), "
                                          f"{age_d:.1f} days old, free {free_bytes / 1e9:.1f} GB; policy of {d.name}",
                           rule.dry_run)
    return Verdict(session, False, "; ".join(why_not))


def verdicts(data_root: Path, dests: list[ShipDestination], verified: dict[str, set[str]],
             active: dict[str, set[str]], now: float | None = None) -> list[Verdict]:
    """The verdict of every session under ``data_root`` (``verified``: session -> destinations the queue says hold a
    verified copy; ``active``: session -> destinations it is still being shipped to)."""
    now = time.time() if now is None else now
    free = shutil.disk_usage(data_root).free
    out = []
    for folder in sorted(p for p in Path(data_root).iterdir() if (p / SESSION_FILE).is_file()):
        try:
            state = json.loads((folder / SESSION_FILE).read_text()).get("state")
        except (OSError, ValueError):
            state = "unreadable"
        try:
            digest, sealed_at = manifest_sha256(folder), (folder / MANIFEST).stat().st_mtime
        except OSError:
            digest = sealed_at = None
        out.append(verdict(folder.name, state, digest, shipped_copies(folder), verified.get(folder.name, set()),
                           sealed_at, dests, now, free, frozenset(active.get(folder.name, ()))))
    return out


def delete(data_root: Path, v: Verdict) -> None:
    """Delete the session ``v`` allows to go, logging what proved it (never follows a link out of the folder)."""
    assert v.delete, v
    folder = Path(data_root) / v.session
    unseal_session(folder)
    shutil.rmtree(folder)
    line = json.dumps({"session": v.session, "deleted_at": time.time(), "proof": v.reason}) + "\n"
    fd = os.open(Path(data_root) / DELETED_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("deleted local session %s: %s", v.session, v.reason)
