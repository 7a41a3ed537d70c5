"""Shipping sealed sessions off the rig: a SQLite job queue, rclone, and sha256 verification at the destination.

``queue`` keeps the jobs, ``rclone`` speaks to rclone, ``verify`` judges a session and a copy against the
manifest, ``shipper`` runs the jobs. The daemon's side (signals, events, metrics) is ``acqd.service.shipping``.
Docs: docs/shipping.md.
"""

from acqd.share.ship.queue import Job, Queue, backoff_s
from acqd.share.ship.shipper import READY, Shipper

__all__ = ["READY", "Job", "Queue", "Shipper", "backoff_s"]
