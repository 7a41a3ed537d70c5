"""Whether a session may leave the rig, and whether it arrived: both judged against its own manifest.

Before shipping, the local session must be finalized and verify against ``manifest.sha256`` (a session changed
after its seal is refused, never shipped as good). At the destination, every manifest file and the manifest itself
must hash to what the manifest says. ``shipping.json`` (beside session.json, outside the sealed set) records each
verified copy: destination, where, when, and the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from acqd.errors import SessionError
from acqd.finalize.layout import MANIFEST, SHIPPING
from acqd.finalize.seal import Digests, read_manifest, verify_manifest
from acqd.session import FINALIZED, now_iso, read_session, write_json_atomic


def expected(folder: Path) -> dict[str, str]:
    """{relative path: sha256} the destination must hold: every manifest line, and the manifest itself."""
    listed = read_manifest(folder)
    listed[MANIFEST] = manifest_sha256(folder)
    return listed


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


def refusal(folder: Path) -> str | None:
    """Why ``folder`` must not be shipped (None: it may): not a finalized session, or changed since its seal."""
    try:
        state = read_session(folder).get("state")
    except SessionError as e:
        return str(e)
    if state != FINALIZED:
        return f"session is {state}, not finalized: only sealed sessions are shipped"
    if problems := verify_manifest(folder):
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return f"session changed since it was sealed, refused: {'; '.join(problems[:3])}{more}"
    return None


def mismatches(want: dict[str, str], found: dict[str, str]) -> list[str]:
    """Files of ``want`` missing from ``found`` or with another sha256, sorted."""
    return sorted(name for name, digest in want.items() if found.get(name) != digest)


def describe(names: list[str], found: dict[str, str]) -> str:
    shown = ", ".join(f"{n} ({'missing' if n not in found else 'sha256 differs'})" for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def shipped_copies(folder: Path) -> list[dict]:
    """The verified copies recorded in ``shipping.json`` (empty when none)."""
    try:
        return json.loads((Path(folder) / SHIPPING).read_text()).get("copies", [])
    except (OSError, ValueError):
        return []


def record_copy(folder: Path, dest: str, where: str, digest: str, what: str = "session") -> None:
    """Add (or refresh) the verified copy of ``what`` (session | export) at ``dest`` in shipping.json (atomically);
    an export's digest is its listing's (``listing_sha256``), so it never proves the session's manifest."""
    copies = [c for c in shipped_copies(folder) if (c.get("destination"), c.get("what", "session")) != (dest, what)]
    copies.append({"destination": dest, "what": what, "path": where, "verified_at": now_iso(), "manifest_sha256": digest})
    write_json_atomic(Path(folder) / SHIPPING, {"copies": sorted(copies, key=lambda c: (c["destination"], c["what"]))})


def export_files(out: Path, names: list[str]) -> dict[str, str]:
    """{name: sha256} of an export's files (its NWB file and videos, relative to the export folder ``out``)."""
    paths = {n: Path(out) / n for n in names}
    with Digests(paths.values()) as digests:
        return {n: digests.get(p) for n, p in paths.items()}


def listing_sha256(files: dict[str, str]) -> str:
    """The sha256 of ``files`` written as a manifest (sorted sha256sum lines): what READY.json names for an export."""
    return hashlib.sha256("".join(f"{d}  {n}\n" for n, d in sorted(files.items())).encode()).hexdigest()


def forget_copy(folder: Path, dest: str, what: str = "session") -> None:
    """A copy found changed by a re-verification is no longer a verified copy."""
    copies = shipped_copies(folder)
    keep = [c for c in copies if (c.get("destination"), c.get("what", "session")) != (dest, what)]
    if keep != copies:
        write_json_atomic(Path(folder) / SHIPPING, {"copies": keep})
