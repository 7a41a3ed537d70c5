"""``GET /api/rig``: this node as a rig's leader sees it (acqd.service.rig.node_info; docs/multi-pc.md).

Every node serves it (a follower needs nothing beyond its token); a leader asks it of each follower at preflight
and once a second while it watches them. Read from the published snapshot: it never waits for the supervisor.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from acqd.service.commands import Response
from acqd.service.rig import node_info
from acqd.service.supervisor import Supervisor


class NodeInfo(Response):
    """Who this node is and what it is doing."""

    node: str
    """The config's ``node``."""
    rig_protocol: int
    wire_protocol: int
    config_version: str
    """A digest of the config schema: nodes of one rig must agree."""
    acqd: str
    time_ns: int
    """This node's wall clock when it answered (the leader's clock offset estimate)."""
    mode: str
    session: str | None
    leader: dict | None
    start_host_ns: int | None
    """Host time of this node's first recorded message in the session (RECORD only)."""
    streams: dict[str, dict]
    disk: dict


def rig_router(sup: Supervisor) -> APIRouter:
    router = APIRouter(tags=["rig"])

    @router.get("/api/rig", response_model=NodeInfo, summary="this node in a rig of several PCs (docs/multi-pc.md)")
    async def rig() -> Any:
        return node_info(sup)

    return router
