"""Which writer processes are hung now: one ``writer_hung`` and one ``writer_recovered`` incident per process.

A group writer (acqd.record.group) hosts up to a hundred streams in one process with one loop: when it stalls, each
of its streams' handles crosses ``heartbeat_timeout_s`` in turn and each shows ``hung`` in the status (acqd.service
.writers judges every handle on its own, as before), but the stall is one event. This module keeps, per writer
process, which of its streams are hung, so that the first stream to go hung reports the process's hang (its detail
names how many streams the process hosts) and the last one to answer again reports its recovery.
Runs on the supervisor thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Hang:
    """An open hang of one writer process: the stream its incidents name and the streams hung now."""

    stream: str
    since: float
    hung: set[str] = field(default_factory=set)


class Hangs(dict[int, Hang]):
    """Writer pid -> its open hang."""

    def went_hung(self, pid: int, stream: str, since: float) -> bool:
        """``stream`` of writer ``pid`` is hung (heard last at ``since``); True if the process's hang is new (to
        report)."""
        hang = self.get(pid)
        new = hang is None
        if new:
            hang = self[pid] = Hang(stream, since)
        hang.hung.add(stream)
        return new

    def answered(self, pid: int, stream: str) -> Hang | None:
        """``stream`` of writer ``pid`` answers again; the process's hang once its last hung stream answered (to
        report), else None."""
        hang = self.get(pid)
        if hang is None:
            return None
        hang.hung.discard(stream)
        return None if hang.hung else self.pop(pid)
