"""LSL discovery: the outlets visible on the network now, and a rig-config entry for each (docs/lsl.md).

Used by ``acqd lsl list`` and ``GET /api/lsl``. A look lasts ``wait_s`` (liblsl answers within ~0.1 s on a
quiet network; one second also catches busy hosts).
"""

from __future__ import annotations

from acqd.wire.lsl import OutletInfo, config_snippet


def list_outlets(wait_s: float = 1.0) -> list[OutletInfo]:
    """Every LSL outlet that answers within ``wait_s``, sorted by name and source_id."""
    import pylsl

    return sorted((OutletInfo.of(i) for i in pylsl.resolve_streams(wait_s)), key=lambda o: (o.name, o.source_id))


def discovery(wait_s: float = 1.0) -> dict:
    """The JSON of ``GET /api/lsl``: each outlet's description and its config snippet."""
    return {"outlets": [{**o.as_dict(), "config": config_snippet(o)} for o in list_outlets(wait_s)]}
