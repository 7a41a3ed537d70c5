"""The rig config's multi-PC part: this PC's ``node`` name and the leader's ``followers`` (docs/multi-pc.md).

A root module beside ``acqd.config.ship``: ``acqd.config.models`` imports ``NodeName`` and ``FollowerList`` into
``RigConfig``. Only validation lives here; ``acqd.service.rig`` drives the followers. A follower needs nothing
new in its config: the leader calls its control API with the follower's own ``control.token``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_serializer, model_validator

from acqd.metadata.models import Frozen as _Frozen

NODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
"""A node name: one path component (``<session>/nodes/<node>/`` on the leader), at most 32 characters."""

URL_PATTERN = r"^https?://[^/\s?#@]+/?$"


def _matching(pattern: str, what: str, hint: str) -> AfterValidator:
    """A pattern check that says what was expected in words (pydantic's own message quotes the regex)."""
    def check(v: str) -> str:
        if not re.fullmatch(pattern, v):
            raise ValueError(f"invalid {what} {v!r}: {hint}")
        return v
    return AfterValidator(check)


NodeName = Annotated[str, Field(json_schema_extra={"pattern": NODE_PATTERN}),
                     _matching(NODE_PATTERN, "node name", "use 1-32 letters, digits, '_', '-', starting with a letter or digit")]


class Follower(_Frozen):
    """Another PC of the rig, driven by this one (the leader) through its control API."""

    name: NodeName
    """The follower's node name: the ``node`` of its own config (checked at preflight)."""
    url: Annotated[str, Field(json_schema_extra={"pattern": URL_PATTERN}),
                   _matching(URL_PATTERN, "follower url", "give http(s)://host:port, e.g. http://10.0.0.12:8600")]
    """The follower's control API, scheme://host:port, e.g. http://10.0.0.12:8600."""
    token: str | None = Field(None, min_length=1)
    """The follower's ``control.token`` (give this or token_file)."""
    token_file: Path | None = None
    """A file holding the follower's token (read at each use; relative to the config file's folder)."""
    max_clock_offset_s: float = Field(1.0, gt=0)
    """RECORD is refused while the follower's clock is further than this from the leader's (seconds)."""
    timeout_s: float = Field(5.0, gt=0, le=120)
    """Timeout of one request to the follower (seconds); a follower that does not answer is unreachable."""

    @field_serializer("token")
    def _hidden(self, v: str | None) -> str | None:
        """Dumps (session.json's config, the Open Ephys config route) never carry a follower's secret."""
        return None if v is None else "***"

    @model_validator(mode="after")
    def _one_token(self) -> Follower:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(f"follower {self.name!r}: give exactly one of token, token_file")
        return self

    def read_token(self) -> str:
        """The token to send; ``OSError``/``ValueError`` when the token file cannot be read or is empty."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        token = self.token_file.read_text().strip()
        if not token:
            raise ValueError(f"token file {self.token_file} is empty")
        return token


def _unique(followers: tuple[Follower, ...]) -> tuple[Follower, ...]:
    names = [f.name for f in followers]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"follower name {dupes[0]!r} is used twice")
    return followers


FollowerList = Annotated[tuple[Follower, ...], AfterValidator(_unique)]
"""``RigConfig.followers``: followers with distinct names (none named like the leader: ``follower_problem``)."""


def follower_problem(node: str, followers: tuple[Follower, ...]) -> str | None:
    """A follower named like this PC's own node (the leader's session lists every node by name once)."""
    if any(f.name == node for f in followers):
        return f"follower {node!r} has this PC's own node name (node: {node!r}): give each PC its own name"
    return None


def resolve_token_files(followers: tuple[Follower, ...], folder: Path) -> tuple[Follower, ...]:
    """Relative token files are relative to the config file's folder, like data_root."""
    return tuple(f.model_copy(update={"token_file": (folder / f.token_file).resolve()})
                 if f.token_file is not None and not f.token_file.is_absolute() else f for f in followers)
