"""What the hasher's integrity costs: the hasher process against `sha256sum` of the same bytes, in the same run.

    .venv/bin/python scripts/bench_hasher.py [--seconds 8] [--channels 384] [--runs 3] [--keep DIR]

Records a session (tests/sessions.py: the test rig with a ``--channels``-channel probe), then, ``--runs`` times
each, interleaved, with the files' pages dropped before every run (cold: read from the disk) and again with
them read into the page cache first (hot):

- ``hasher``: the real hasher process (``python -m acqd.finalize.hasher``) over every part, as the daemon runs
  it; CPU = user + system of the child (``wait4``), and the same for a hasher given no job (its start-up, to
  subtract);
- ``sha256sum``: coreutils over the same files, CPU the same way;

then, in this process, the hasher's work per file without its start-up (``digest_part``: sha256, chunk check,
cache drop), cold and hot, and where it goes: sha256 by read size (hashlib, OpenSSL), the HDF5 reads of
the chunk check, zlib's crc32 over the same bytes (and ISA-L's, if the ``isal`` package is importable). Prints
medians as JSON. Not a test: the figures depend on the machine, its disk and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from acqd.finalize.hasher import digest_part  # noqa: E402
from acqd.finalize.integrity import verify_part  # noqa: E402
from acqd.session import read_session  # noqa: E402
from acqd.sim.simulate import Rig, SimParams  # noqa: E402
from sessions import Recording, record_session, small_config  # noqa: E402


def child_cpu(args: list[str], stdin: str = "") -> tuple[float, float]:
    """(CPU seconds, wall seconds) of a child process run to its end."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            text=True)
    proc.stdin.write(stdin)
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, args
    return usage.ru_utime + usage.ru_stime, time.monotonic() - t0


def drop(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def cpu_of(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def sha256_blocks(path: Path, block: int) -> str:
    h, buf = hashlib.sha256(), bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--out", type=Path, help="write the JSON result here too")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-hasher-"))
    cfg = small_config(root / "data", probe_channels=args.channels)
    folder = record_session(cfg, Rig(cfg, SimParams(seed=3, seconds=args.seconds + 40)), "H",
                            Recording(seconds=args.seconds))
    jobs = [{"path": p["path"], "stream": name} for name, s in read_session(folder)["streams"].items()
            for p in s["parts"]]
    paths = [folder / j["path"] for j in jobs]
    total = sum(p.stat().st_size for p in paths)
    lines = "".join(json.dumps(j) + "\n" for j in jobs)
    hasher = [sys.executable, "-m", "acqd.finalize.hasher", str(folder), str(os.getpid())]
    out: dict = {"bytes": total, "files": len(paths), "runs": args.runs}
    runs: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for cache in ("cold", "hot"):
            for name, argv, stdin in (("hasher", hasher, lines), ("hasher_startup", hasher, ""),
                                      ("sha256sum", ["sha256sum", *map(str, paths)], "")):
                (folder / "digests.jsonl").unlink(missing_ok=True)
                drop(paths) if cache == "cold" else warm(paths)
                cpu, wall = child_cpu(argv, stdin)
                runs.setdefault(f"{name}_{cache}_cpu_s", []).append(cpu)
                runs.setdefault(f"{name}_{cache}_wall_s", []).append(wall)
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    out["median"] = med
    for cache in ("cold", "hot"):
        net = med[f"hasher_{cache}_cpu_s"] - med[f"hasher_startup_{cache}_cpu_s"]
        out[f"hasher_over_sha256sum_{cache}"] = round(med[f"hasher_{cache}_cpu_s"] / med[f"sha256sum_{cache}_cpu_s"], 2)
        out[f"hasher_net_of_startup_over_sha256sum_{cache}"] = round(net / med[f"sha256sum_{cache}_cpu_s"], 2)

    # Where the CPU goes (in this process, medians of --runs): the hasher's work per file without its start-up,
    # cold (it drops every file from the cache after reading it) and hot; then its parts, hot.
    parts = {folder / j["path"]: j["stream"] for j in jobs}
    split: dict[str, list[float]] = {}

    class Never:
        def is_set(self) -> bool:
            return False

    for _ in range(args.runs):
        for cache in ("cold", "hot"):
            drop(paths) if cache == "cold" else warm(paths)
            split.setdefault(f"digest_part_{cache}_cpu_s", []).append(
                sum(cpu_of(digest_part, folder, j["path"], j["stream"], Never()) for j in jobs))
        warm(paths)
        for block in (64 << 10, 1 << 20, 4 << 20, 16 << 20):
            split.setdefault(f"sha256_read_{block >> 10}k_cpu_s", []).append(
                sum(cpu_of(sha256_blocks, p, block) for p in paths))
        split.setdefault("chunk_check_cpu_s", []).append(
            sum(cpu_of(verify_part, s, p, p.name) for p, s in parts.items()))
        blobs = []
        t0 = time.process_time()
        for p in parts:
            with h5py.File(p, "r") as f:
                blobs.append(np.ascontiguousarray(f["data"][:]))
        split.setdefault("hdf5_read_data_cpu_s", []).append(time.process_time() - t0)
        split.setdefault("zlib_crc32_cpu_s", []).append(sum(cpu_of(zlib.crc32, b.data) for b in blobs))
        try:
            from isal import isal_zlib
            split.setdefault("isal_crc32_cpu_s", []).append(sum(cpu_of(isal_zlib.crc32, b.data) for b in blobs))
            assert all(isal_zlib.crc32(b.data) == zlib.crc32(b.data) for b in blobs)
        except ImportError:
            pass
        split.setdefault("data_bytes", []).append(sum(b.nbytes for b in blobs))
    out["in_process_median"] = {k: round(statistics.median(v), 4) for k, v in split.items()}
    for cache in ("cold", "hot"):
        out[f"digest_part_over_sha256sum_{cache}"] = round(
            out["in_process_median"][f"digest_part_{cache}_cpu_s"] / med[f"sha256sum_{cache}_cpu_s"], 2)
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
