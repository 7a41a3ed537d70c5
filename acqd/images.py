"""Image files of a session: the stimulus image sets registered at RECORD and the photos attached before finalize.

This module owns reading an image file into the array NWB stores (Pillow: 2-D grayscale, (h, w, 3) RGB or
(h, w, 4) RGBA), the order of a stimulus image set (index i = the i-th image file of the folder in sorted name
order), the copy of each set into the session folder (``stimuli/<stream>/``) so a session finalizes without the
rig's folders, and the attachments (``attachments/<name>`` + ``attachments/<name>.json``: description,
resolution, who, when). Finalize reads both back (``acqd.finalize.plan``); the CLI and the control API attach.

It sits at the package root, beside its callers rather than under ``acqd.metadata``: it needs the rig config and
the session folder (which metadata may not import), and three stages call it (``sim`` lists an image set's files,
``service`` registers and attaches, ``finalize`` reads them back), so the root is the one place all may import.
"""

from __future__ import annotations

import fcntl
import getpass
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from acqd.config import DaemonConfig, RigConfig
from acqd.errors import ConfigError, SessionError
from acqd.files import create_file, open_folder, read_bounded
from acqd.session import CLOSED, INTERRUPTED, RECORDING, now_iso, read_session

STIMULI_DIR = "stimuli"
ATTACHMENTS_DIR = "attachments"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
"""File names a stimulus image set and an attachment may have (anything else in an image folder is ignored)."""
_ATTACHABLE_STATES = (RECORDING, CLOSED, INTERRUPTED)  # before finalize; the master is built from them once
_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF")  # Pillow's names for IMAGE_SUFFIXES: no other decoder is tried
DEFAULT_MAX_PIXELS: int = DaemonConfig.model_fields["max_image_pixels"].default
MAX_IMAGE_BYTES = 256 << 20
"""An attachment file larger than this is refused before it is read (a photo is a few MB)."""


def read_image(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """The pixels of an image file (a path, or its bytes): (h, w) grayscale, (h, w, 3) RGB or (h, w, 4) RGBA;
    ConfigError if unreadable, or if its header claims more than ``max_pixels`` pixels: that is checked before
    anything is decoded (a 140 kB PNG can claim 144 megapixels, 413 MB once decoded), and Pillow's own
    ``MAX_IMAGE_PIXELS`` bomb check applies too."""
    from PIL import Image, UnidentifiedImageError  # imported late: only finalize and attach read images

    name = name or str(source)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below says it in one line
            with Image.open(fp, formats=_FORMATS) as im:  # reads the header only
                width, height = im.size
                if width * height > max_pixels:
                    raise ConfigError(f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is "
                                      f"more than the {max_pixels / 1e6:g} allowed (daemon.max_image_pixels); "
                                      "refused before decoding")
                if im.mode in ("1", "P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                    # Palette and two-channel modes have no NWB type of their own: widen to RGB(A), losing nothing.
                    im = im.convert("RGBA" if im.mode in ("PA", "LA") or "transparency" in im.info else "RGB")
                return np.array(im)
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
        raise ConfigError(f"{name}: {e} (daemon.max_image_pixels: {max_pixels}); refused before decoding") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{name}: not an image file Pillow can read ({e})") from None


def image_files(folder: Path) -> list[Path]:
    """A stimulus image set: the image files of ``folder`` in sorted name order (index i = the i-th)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"stimulus image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"stimulus image folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return files


def check_stimulus_images(cfg: RigConfig) -> None:
    """Every stimulus stream's image set exists and every file reads as an image (before RECORD starts)."""
    for s in cfg.streams:
        if s.stimulus is not None and s.stimulus.images is not None:
            for p in image_files(s.stimulus.images):
                read_image(p, cfg.daemon.max_image_pixels)


def register_stimulus_images(session_folder: Path, cfg: RigConfig) -> dict[str, list[str]]:
    """Copy each stimulus stream's image set into ``stimuli/<stream>/``; returns {stream: [file names in order]}."""
    out = {}
    for s in cfg.streams:
        if s.stimulus is None or s.stimulus.images is None:
            continue
        dest = Path(session_folder) / STIMULI_DIR / s.name
        dest.mkdir(parents=True, exist_ok=False)
        files = image_files(s.stimulus.images)
        for p in files:
            shutil.copyfile(p, dest / p.name)
        out[s.name] = [p.name for p in files]
    return out


def session_stimulus_images(session_folder: Path, stream: str) -> list[tuple[str, np.ndarray]]:
    """(file name, pixels) of a stream's registered image set, in index order (ConfigError if it is missing)."""
    cap = _max_pixels(session_folder)
    return [(p.name, read_image(p, cap)) for p in image_files(Path(session_folder) / STIMULI_DIR / stream)]


def _max_pixels(session_folder: Path) -> int:
    """The pixel cap of the session's frozen config (``daemon.max_image_pixels``; its default for older sessions)."""
    daemon = (read_session(session_folder).get("config") or {}).get("daemon") or {}
    return int(daemon.get("max_image_pixels") or DEFAULT_MAX_PIXELS)


def attach(session_folder: Path, file: Path, description: str, resolution: float | None = None,
           who: str | None = None) -> dict:
    """Copy an image into ``attachments/`` with its sidecar; refused once the session is (being) finalized.

    The bytes read once are the bytes checked and the bytes written. Both files are created exclusively under a
    descriptor of ``attachments/`` opened without following links: a planted link (the folder, a dangling or a
    live ``<name>`` or ``<name>.json``) is refused, never written through. Returns the sidecar: name,
    description, resolution (pixels per cm), shape, attached_by, attached_at.
    """
    folder, file = Path(session_folder), Path(file)
    if not description.strip():
        raise ConfigError("an attachment needs a description (what the image shows)")
    if resolution is not None and not resolution > 0:
        raise ConfigError(f"resolution {resolution} must be positive (pixels per cm)")
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"{file.name}: not an image file name ({', '.join(IMAGE_SUFFIXES)})")
    data = read_bounded(file, MAX_IMAGE_BYTES)
    pixels = read_image(data, _max_pixels(folder), file.name)  # refuses a non-image (or a bomb) before anything is written
    fd = open_folder(folder)
    try:
        try:  # finalize holds this lock while it runs: no attachment slips in behind its folder scan
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SessionError(f"{folder.name} is being finalized: attach before finalize") from None
        state = read_session(folder).get("state")
        if state not in _ATTACHABLE_STATES:
            raise SessionError(f"{folder.name} is {state}: images can only be attached before finalize (the sealed "
                               "master is never rewritten); attach them to the next session")
        name = _safe_name(file.name)
        sidecar = {"name": name, "description": description, "resolution": resolution,
                   "shape": list(pixels.shape), "attached_by": who or getpass.getuser(), "attached_at": now_iso(),
                   "source": str(file)}
        _write_attachment(fd, folder.name, name, data, json.dumps(sidecar, indent=1).encode())
        return sidecar
    finally:
        os.close(fd)


def _write_attachment(session_fd: int, session: str, name: str, data: bytes, sidecar: bytes) -> None:
    """``attachments/<name>`` and its ``.json`` sidecar, both new, under the session folder's descriptor."""
    try:
        dir_fd = open_folder(ATTACHMENTS_DIR, session_fd, create=True)
    except OSError as e:
        raise SessionError(f"{session}/{ATTACHMENTS_DIR} is not a folder of the session ({e.strerror}): "
                           "a link or a file in its place is never written through") from None
    try:
        for i, (file, content) in enumerate(((name, data), (f"{name}.json", sidecar))):
            try:
                create_file(dir_fd, file, content)
            except FileExistsError:
                if i:  # the image was written by this call: remove it, leaving the folder as it was found
                    os.unlink(name, dir_fd=dir_fd)
                raise SessionError(f"{session} already has an attachment file named {file} (or a link in its "
                                   "place): nothing was written") from None
    finally:
        os.close(dir_fd)


def attachments(session_folder: Path) -> list[tuple[dict, np.ndarray]]:
    """Every attachment (sidecar, pixels), in name order."""
    folder = Path(session_folder) / ATTACHMENTS_DIR
    out = []
    for sidecar in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        meta = json.loads(sidecar.read_text())
        out.append((meta, read_image(folder / meta["name"], _max_pixels(session_folder))))
    return out


def _safe_name(name: str) -> str:
    """One path component of letters, digits, '_', '.', '-' (what layout.known_file accepts)."""
    stem, suffix = os.path.splitext(name)
    clean = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem).lstrip(".") or "image"
    return clean[:64] + suffix.lower()


__all__ = ["ATTACHMENTS_DIR", "IMAGE_SUFFIXES", "STIMULI_DIR", "attach", "attachments",
           "check_stimulus_images", "image_files", "read_image", "register_stimulus_images",
           "session_stimulus_images"]
