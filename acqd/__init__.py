"""acqd: a streaming acquisition daemon for neuroscience rigs.

The public API, for drivers, scripts and analysis; the rest of the package is internal:

    Publisher, edge_records                 acqd.wire.publisher: send chunks to acqd (docs/protocol.md)
    load_config, RigConfig                  acqd.config: read and validate a rig file
    Client                                  acqd.client: drive a running daemon (docs/control-api.md)
    finalize_session                        acqd.finalize: align clocks, build and seal the master NWB
    export_session                          acqd.share.export: one self-contained NWB for DANDI
    new_analysis, open_analysis             acqd.share.analysis: analysis files that link sealed raw data
    AcqdError and its subclasses            acqd.errors

Names are imported on first use, so a writer process never pays for pynwb.

The package follows the data path: ``wire`` (the protocol, drivers' side) -> ``record`` (one stream to its file)
-> ``finalize`` (the master NWB, sealing) -> ``share`` (what leaves the rig); ``service`` (the daemon and its
protocols) sits on top, ``sim`` (the simulated rig) aside. The root is shared by all and imports none of them:
``config/`` (the rig config), ``metadata/`` (session metadata, probe layouts; below the config), ``errors``,
``session`` (the session folder), ``images`` (image files of a session), ``client`` (the control API's client);
``cli`` and ``demo`` are the entry points. Each sub-package's docstring says what it owns and may import;
tests/test_layout.py holds the lines.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Publisher": "acqd.wire.publisher", "edge_records": "acqd.wire.publisher",
    "load_config": "acqd.config", "RigConfig": "acqd.config",
    "Client": "acqd.client",
    "finalize_session": "acqd.finalize",
    "export_session": "acqd.share.export",
    "new_analysis": "acqd.share.analysis", "open_analysis": "acqd.share.analysis",
    "AcqdError": "acqd.errors", "ConfigError": "acqd.errors", "ProtocolError": "acqd.errors",
    "SessionError": "acqd.errors", "WriterError": "acqd.errors", "DiskFullError": "acqd.errors",
    "FinalizeError": "acqd.errors", "ClockFitError": "acqd.errors", "ExportError": "acqd.errors",
    "AnalysisError": "acqd.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'acqd' has no attribute {name!r}")
