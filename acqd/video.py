"""Camera frames encoded into external video files, as the NWB ecosystem expects for behaviour video.

A ``VideoSink`` encodes the frames of one stream part into a sequence of files
``<session>/video/<stream>_<part>_<n>.<ext>``, starting a new file every ``frames_per_file`` frames so
that a crash can only leave the last file short. FFV1 in Matroska is lossless (bit-exact); H.264
goes into fragmented MP4, which stays readable if the writer dies mid-file. Codecs come from PyAV's
own FFmpeg build. The stream file's ``/video`` table lists each finished file with its frames.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from acqd.config import VideoConfig

CONTAINERS = {"ffv1": ("mkv", {}), "libx264": ("mp4", {"movflags": "frag_keyframe+empty_moov"})}
VIDEO_DIR = "video"


def video_filename(stream: str, part: int, n: int, codec: str) -> str:
    return f"{stream}_{part:03d}_{n:04d}.{CONTAINERS[codec][0]}"


class VideoSink:
    """Encodes gray8 frames (height, width) of one stream part; not thread-safe."""

    def __init__(self, folder: Path, stream: str, part: int, cfg: VideoConfig, rate: float):
        self.folder, self.stream, self.part, self.cfg = folder, stream, part, cfg
        self.rate = Fraction(rate).limit_denominator(1000)
        self.finished: list[tuple[str, int, int]] = []  # (file name, first frame, frames)
        self.frames = 0
        self._file: tuple[av.container.OutputContainer, av.video.stream.VideoStream, str, int] | None = None

    def append(self, frames: np.ndarray) -> list[tuple[str, int, int]]:
        """Encode frames; returns the files finished by this call as (name, first frame, frames)."""
        done = []
        for frame in frames:
            if self._file is None:
                self._open(*frame.shape)
            container, stream, _, first = self._file
            vf = av.VideoFrame.from_ndarray(frame, format="gray")
            vf.pts = self.frames - first
            for packet in stream.encode(vf):
                container.mux(packet)
            self.frames += 1
            if self.frames - first >= self.cfg.frames_per_file:
                done.append(self._finish())
        return done

    def _open(self, height: int, width: int) -> None:
        ext, options = CONTAINERS[self.cfg.codec]
        name = video_filename(self.stream, self.part, len(self.finished), self.cfg.codec)
        self.folder.mkdir(exist_ok=True)
        path = self.folder / name
        if path.exists():  # never overwrite a recording
            raise FileExistsError(path)
        container = av.open(str(path), "w", options=options)
        codec_options = {"crf": str(self.cfg.crf), "preset": "veryfast"} if self.cfg.codec == "libx264" else {}
        stream = container.add_stream(self.cfg.codec, rate=self.rate, options=codec_options)
        stream.width, stream.height, stream.pix_fmt = width, height, "gray"
        stream.time_base = 1 / self.rate
        self._file = (container, stream, name, self.frames)

    def _finish(self) -> tuple[str, int, int]:
        container, stream, name, first = self._file
        self._file = None
        for packet in stream.encode(None):
            container.mux(packet)
        container.close()
        self.finished.append((name, first, self.frames - first))
        return self.finished[-1]

    def close(self) -> list[tuple[str, int, int]]:
        """Finish the open file, if any; returns it like ``append``."""
        return [self._finish()] if self._file is not None else []
