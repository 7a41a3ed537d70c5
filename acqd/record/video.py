"""Camera frames encoded into external video files, as the NWB ecosystem expects for behaviour video.

A ``VideoSink`` encodes the frames of one stream part into a sequence of files
``<session>/video/<stream>_<part>_<n>.<ext>``, starting a new file every ``frames_per_file`` frames so
that a crash can only leave the last file short. Encoding runs on a thread of its own (PyAV 18 releases
the GIL in ``avcodec_send_frame`` / ``avcodec_receive_packet``, where FFV1 spends its time): the writer's
socket loop never waits for the encoder, so its receive timestamps stay true arrival times, which finalize
needs to pair frames with strobes, and it keeps answering the supervisor. The encoder's queue holds at most
``VideoConfig.max_backlog_s`` of frames; a frame beyond that is refused (``has_room`` is False)
and the writer records it as a gap with reason ``encoder``: never a silent loss, never a stalled receive
path (issue 24; docs/file-format.md). Only frames in finished files count as committed. FFV1 in Matroska is lossless (bit-exact); H.264
goes into fragmented MP4, which stays readable if the writer dies mid-file. Codecs come from PyAV's
own FFmpeg build. The stream file's ``/video`` table lists each finished file with its frames.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from acqd.config import VideoConfig
from acqd.errors import WriterError

if TYPE_CHECKING:
    import av

CONTAINERS = {"ffv1": ("mkv", {}), "libx264": ("mp4", {"movflags": "frag_keyframe+empty_moov"})}
VIDEO_DIR = "video"
PROGRESS_S = 0.25
"""While ``close`` waits for the encoder, it reports progress this often (the writer's heartbeat meanwhile)."""


def video_filename(stream: str, part: int, n: int, codec: str) -> str:
    return f"{stream}_{part:03d}_{n:04d}.{CONTAINERS[codec][0]}"


class VideoSink:
    """Encodes gray8 frames (height, width) of one stream part; not thread-safe."""

    def __init__(self, folder: Path, stream: str, part: int, cfg: VideoConfig, rate: float,
                 delay_s: float = 0.0):
        self.folder, self.stream, self.part, self.cfg = folder, stream, part, cfg
        self.rate = Fraction(rate).limit_denominator(1000)
        self.finished: list[tuple[str, int, int]] = []  # (file name, first frame, frames), all files so far
        self.frames = 0  # frames encoded (encoder thread)
        self.max_backlog = max(1, round(cfg.max_backlog_s * rate))
        self.delay_s = delay_s  # the ``slow_encode`` test hook (acqd.record.faults): seconds added per frame
        self._file: tuple[av.container.OutputContainer, av.video.stream.VideoStream, str, int] | None = None
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue()  # bounded by ``offer``, never blocks a put
        self._reported = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode_loop, name=f"video-{stream}", daemon=True)
        self._thread.start()

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more frames fit the backlog; if not, the caller records them as lost (reason ``encoder``)."""
        queued = self._queue.qsize()
        return queued == 0 or queued + n <= self.max_backlog  # a message larger than the bound fits an empty queue

    def append(self, frames: np.ndarray) -> None:
        """Queue frames (height, width) for encoding; never blocks (``has_room`` bounds the backlog)."""
        self._raise()
        for frame in frames:
            self._queue.put(frame)

    @property
    def backlog(self) -> int:
        """Frames waiting for the encoder."""
        return self._queue.qsize()

    def take_finished(self) -> list[tuple[str, int, int]]:
        """The files finished since the last call (the encoder thread appends, this reads: no waiting)."""
        self._raise()
        done = self.finished[self._reported:]
        self._reported += len(done)
        return done

    @property
    def committed(self) -> int:
        """Frames in the files returned by ``take_finished`` so far: what a crash cannot take back."""
        if not self._reported:
            return 0
        _, first, n = self.finished[self._reported - 1]
        return first + n

    def close(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode what is queued and finish the open file; then ``take_finished`` returns it. However long the
        backlog takes, ``progress(backlog, frames encoded)`` is called every PROGRESS_S meanwhile."""
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(PROGRESS_S)
            if progress is not None and self._thread.is_alive():
                progress(self.backlog, self.frames)
        self._raise()

    def _raise(self) -> None:
        if isinstance(self._error, OSError):
            raise self._error  # the caller classifies it (disk full, ...)
        if self._error is not None:
            raise WriterError(f"video encoding failed: {self._error!r}") from self._error

    def _encode_loop(self) -> None:
        while True:
            frame = self._queue.get()
            try:
                if self._error is None:  # after a failure, frames are drained unencoded
                    if frame is None:
                        if self._file is not None:
                            self._finish()
                    else:
                        self._encode(frame)
            except BaseException as e:  # noqa: BLE001 - handed to the writer at its next call
                self._error = e
            finally:
                self._queue.task_done()
            if frame is None:
                return

    def _encode(self, frame: np.ndarray) -> None:
        import av  # here, not at the top: every writer imports this module, few encode video (PyAV takes ~0.3 s)

        if self._file is None:
            self._open(*frame.shape)
        container, stream, _, first = self._file
        if self.delay_s:
            time.sleep(self.delay_s)
        vf = av.VideoFrame.from_ndarray(frame, format="gray")
        vf.pts = self.frames - first
        for packet in stream.encode(vf):
            container.mux(packet)
        self.frames += 1
        if self.frames - first >= self.cfg.frames_per_file:
            self._finish()

    def _open(self, height: int, width: int) -> None:
        ext, options = CONTAINERS[self.cfg.codec]
        name = video_filename(self.stream, self.part, len(self.finished), self.cfg.codec)
        self.folder.mkdir(exist_ok=True)
        path = self.folder / name
        if path.exists():  # never overwrite a recording
            raise FileExistsError(path)
        import av

        container = av.open(str(path), "w", options=options)
        codec_options = {"crf": str(self.cfg.crf), "preset": "veryfast"} if self.cfg.codec == "libx264" else {}
        stream = container.add_stream(self.cfg.codec, rate=self.rate, options=codec_options)
        stream.width, stream.height, stream.pix_fmt = width, height, "gray"
        stream.time_base = 1 / self.rate
        self._file = (container, stream, name, self.frames)

    def _finish(self) -> None:
        container, stream, name, first = self._file
        self._file = None
        for packet in stream.encode(None):
            container.mux(packet)
        container.close()
        self.finished.append((name, first, self.frames - first))
