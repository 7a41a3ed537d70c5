"""The rig config's ``ship:`` list: where sealed sessions go once they leave the rig (docs/shipping.md).

A root module (not ``acqd.config``) so that the shipping models stay out of the config module's way; ``acqd.config``
imports them into ``RigConfig.ship``. Only validation lives here: ``acqd.share.ship`` does the shipping.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from acqd.metadata.models import Frozen as _Frozen

# rclone's --bwlimit: a size with an optional suffix, or "off" (a timetable is not accepted: it hides the limit).
_BWLIMIT = re.compile(r"^(off|\d+(\.\d+)?[BKMGTP]?(:\d+(\.\d+)?[BKMGTP]?)?)$", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PATH_FIELDS = ("session", "node")
"""The placeholders a destination's ``path`` may hold."""


class DeleteAfter(_Frozen):
    """When the local copy of a session may be deleted: only after proof, and only when every condition holds."""

    verified_copies: int = Field(1, ge=1)
    """Destinations (this one included) that must have verified the session."""
    min_age_days: float = Field(7.0, ge=0)
    """The session is at least this old (days since it was finalized)."""
    free_below_bytes: int | None = Field(None, gt=0)
    """If set: only while the data root's free space is below this many bytes."""
    dry_run: bool = False
    """Log what would be deleted and why, delete nothing."""


class Webhook(_Frozen):
    """A POST to the lab's pipeline once a destination verified a session (JSON: session, destination, manifest
    sha256, QC verdicts, paths)."""

    url: str = Field(pattern=r"^https?://")
    """Where to POST."""
    timeout_s: float = Field(10.0, gt=0)
    """Timeout of one POST (seconds)."""
    retries: int = Field(5, ge=0)
    """Further attempts after a failed POST, with doubling waits from 1 s."""


class ShipDestination(_Frozen):
    """One place sessions are copied to with rclone and verified at (sha256 against the manifest)."""

    name: str
    """Name of the destination (`acqd ship SESSION --to NAME`)."""
    remote: str = Field(min_length=1)
    """rclone remote path: a local folder or mount (/mnt/nas/acqd) or remote:path (lab-sftp:data/rig1)."""
    path: str = "{session}"
    """Where a session lands below remote: a relative path with the placeholders {session} (the session id) and
    {node} (the PC's node name from session.json; "main" on a one-PC rig). A follower shipping to the leader:
    "{session}/nodes/{node}"."""
    sessions: Literal["all", "led", "own"] = "all"
    """Which sessions go here: all, led (only those a leader started: session.json has "leader"; a follower's
    destination "leader"), or own (only those without a leader)."""
    rclone_config: Path | None = None
    """rclone config file naming the remote; default: rclone's own (~/.config/rclone/rclone.conf)."""
    what: Literal["session", "export", "both"] = "session"
    """What to send: the sealed session folder, its export, or both."""
    after: Literal["finalize", "export", "manual"] = "finalize"
    """When to queue a session automatically: once finalized, once exported, or only on `acqd ship`."""
    while_recording: Literal["pause", "throttle"] = "pause"
    """While a session records: stop copying (resumed after), or copy at throttle_bwlimit."""
    bwlimit: str | None = None
    """rclone --bwlimit when no session records (e.g. 50M); none: unlimited."""
    throttle_bwlimit: str = "1M"
    """rclone --bwlimit while a session records (while_recording: throttle)."""
    retries: int = Field(3, ge=1)
    """rclone --retries within one attempt."""
    low_level_retries: int = Field(10, ge=1)
    """rclone --low-level-retries within one attempt."""
    max_attempts: int = Field(8, ge=1)
    """Attempts before a job is failed for good (`acqd ship --retry ID` queues it again)."""
    backoff_s: float = Field(30.0, gt=0)
    """Wait after a first failed attempt; doubles with each further one."""
    max_backoff_s: float = Field(3600.0, gt=0)
    """Cap of that wait."""
    timeout_s: float = Field(6 * 3600.0, gt=0)
    """An rclone run still going after this long is stopped and the attempt counted as failed."""
    stall_timeout_s: float = Field(120.0, ge=5)
    """An rclone run that moves no byte for this long (time it waited for a CPU not counted) is stopped and the
    attempt counted as failed: a destination that stops answering never holds a job for rclone's own 5 minutes."""
    download_check: bool | None = None
    """Hash at the destination by reading files back (rclone hashsum --download); default: only when the backend
    cannot hash sha256 itself."""
    delete_after: DeleteAfter | None = None
    """Delete the local session once proven safe (off by default)."""
    webhook: Webhook | None = None
    """POST to this URL when this destination verified a session."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v) or ".." in v:
            raise ValueError(f"invalid destination name {v!r}: use 1-64 letters, digits, '_', '.', '-'")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"invalid path {v!r}: {e}") from None
        if bad := [f for f, spec, conv in fields if f not in PATH_FIELDS or spec or conv]:
            raise ValueError(f"invalid path {v!r}: unknown placeholder {{{bad[0]}}}; use {{session}} and {{node}}")
        fields = [f for f, _, _ in fields]
        parts = v.split("/")
        if v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid path {v!r}: a relative path below remote without '.', '..', '//' or a "
                             "leading or trailing '/'")
        if "session" not in fields:
            raise ValueError(f"invalid path {v!r}: it must hold {{session}}, or every session lands in one folder")
        return v

    def where(self, session: str, node: str) -> str:
        """``path`` with its placeholders filled: the session's folder below ``remote``."""
        return self.path.format(session=session, node=node)

    def takes(self, led: bool) -> bool:
        """Whether a session goes here by ``sessions``: ``led`` says whether a leader started it."""
        return self.sessions == "all" or (self.sessions == "led") == led

    @field_validator("bwlimit", "throttle_bwlimit")
    @classmethod
    def _bwlimit(cls, v: str | None) -> str | None:
        if v is not None and not _BWLIMIT.fullmatch(v):
            raise ValueError(f"invalid bandwidth {v!r}: a size in bytes/s with an optional suffix, e.g. 10M, 512K")
        return v


def _unique(dests: tuple[ShipDestination, ...]) -> tuple[ShipDestination, ...]:
    names = [d.name for d in dests]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"destination name {dupes[0]!r} is used twice")
    return dests


ShipList = Annotated[tuple[ShipDestination, ...], AfterValidator(_unique)]
"""``RigConfig.ship``: destinations with distinct names."""
