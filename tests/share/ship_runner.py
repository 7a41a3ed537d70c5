"""A shipping process for the kill tests: ``python -m tests.share.ship_runner DATA_ROOT DEST_JSON SESSION...``.

Runs a ``Shipper`` (as the daemon does) on the given destinations until every job of the given sessions is
verified or failed, then exits 0. Being its own process, it can be killed -9 at any moment and started again.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from acqd.share.ship import Shipper
from acqd.config.ship import ShipDestination


def main(argv: list[str]) -> int:
    data_root, dests, sessions = Path(argv[0]), json.loads(Path(argv[1]).read_text()), argv[2:]
    shipper = Shipper(data_root, tuple(ShipDestination(**d) for d in dests))
    shipper.start()
    for name in sessions:
        shipper.ship(data_root / name)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all(j.state in ("verified", "failed") for j in shipper.queue.jobs() if j.session in sessions):
            shipper.stop()
            return 0
        time.sleep(0.05)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
