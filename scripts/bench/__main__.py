#!/usr/bin/env python3
"""Benchmark acqd: the real daemon, the real simulated drivers, real sockets, real files.

    .venv/bin/python scripts/bench --quick --doc /tmp/perf.md     # ~20 minutes: proves every scenario runs
    .venv/bin/python scripts/bench --repeat 3                      # the figures in docs/performance.md
    .venv/bin/python scripts/bench --scenarios reference --seconds 600
    .venv/bin/python scripts/bench --scenarios naive --update full.json --out full.json   # rerun one scenario

Scenarios (``--scenarios``, comma-separated; default all):
  reference  configs/bench-rig.yaml (4 probes, 2 cameras, NIDAQ, 2 sensors) recorded for ``--seconds``:
             messages lost, acqd CPU (supervisor + writers + hasher), RSS over time, publish->flushed latency, MB/s.
  ramp       N probes (1, 2, 4, 6, ...) for ``--step-seconds`` each until the first loss, uncompressed
             and with blosc-lz4: the highest aggregate MB/s acqd keeps up with.
  naive      the same ramp into a naive single-process receiver (scripts/bench_baselines.py).
  disk       the disk's sequential write rate with fdatasync (``--disk-gib``, 4 MiB blocks).
  pynwb      pynwb DataChunkIterator writing probe-like data, file to file (``--pynwb-gib``).
  finalize   time ``acqd finalize`` on a short session and one with 10x the data (skipped if absent).
  preview    what an open console page costs the reference rig (bench/preview.py).
  slow       slow streams only (NIDAQ, 1 kHz sensors, an idle stream): CPU per writer (bench/slow.py).
  ship       shipping with while_recording: throttle during RECORD: CPU and messages lost (bench/ship.py).
  synclock   the live sync lock on vs off, the reference rig in alternate windows (bench/synclock.py).
  many       the reference rig plus 8, 32, 96 slow streams: marginal cost per slow stream, mode-change times,
             status latency (bench/many.py).
  hasher     the daemon's hasher process against sha256sum of the same bytes, cold and hot (bench/hasher.py).

A ramp step "keeps up" when no message is lost or rejected, the simulator stayed on its real-time
schedule, and the receiver has no growing backlog (p99 publish->receive under BACKLOG_LIMIT_MS).
PUB/SUB with the simulator's 100k-message send queue buffers rather than drops within a short
window, so a backlog is the first sign of a receiver that cannot keep up.

Prints a JSON result (also to ``--out``) and a Markdown table, and rewrites the generated part of
``--doc`` (default docs/performance.md; a ``--quick`` run writes it only if ``--doc`` is given).
Never part of ``make test``. Every subprocess has a deadline and is reaped (acqd.service.procs).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python scripts/bench`: import the bench package from scripts/, not its modules from scripts/bench/
# (where pynwb.py would shadow the real pynwb).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

from bench.common import DOC, ROOT, SCENARIOS, log, to_json  # noqa: E402
from bench.disk import scenario_disk  # noqa: E402
from bench.finalize import scenario_finalize  # noqa: E402
from bench.hasher import scenario_hasher  # noqa: E402
from bench.many import scenario_many  # noqa: E402
from bench.naive import scenario_naive  # noqa: E402
from bench.procwatch import RSS_LIMIT_MB  # noqa: E402
from bench.preview import scenario_preview  # noqa: E402
from bench.pynwb import scenario_pynwb  # noqa: E402
from bench.ramp import scenario_ramp  # noqa: E402
from bench.reference import scenario_reference  # noqa: E402
from bench.ship import scenario_ship  # noqa: E402
from bench.slow import scenario_slow  # noqa: E402
from bench.synclock import scenario_synclock  # noqa: E402
from bench.report import code_fingerprint, machine_info, markdown, targets, write_doc  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows (30 s reference, 10 s ramp steps), 1 run")
    p.add_argument("--repeat", type=int, help="runs per scenario; medians are reported (default 3, quick 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--seconds", type=float, help="reference rig recording length (default 300, quick 30)")
    p.add_argument("--repeat-reference", type=int, help="runs of the reference rig (default: --repeat)")
    p.add_argument("--repeat-finalize", type=int, help="runs of the finalize scenario (default: --repeat)")
    p.add_argument("--flush-interval", type=float, help="override daemon.flush_interval_s of the bench rigs")
    p.add_argument("--part-seconds", type=float, help="max_file_seconds of every stream of the reference and "
                                                      "finalize rigs (parts closed, hashed while recording)")
    p.add_argument("--step-seconds", type=float, help="recording length of each ramp step (default 20, quick 10)")
    p.add_argument("--max-probes", type=int, default=48, help="stop the ramp here")
    p.add_argument("--ramp-compression", default="none,blosc-lz4", help="compression variants of the acqd ramp")
    p.add_argument("--disk-gib", type=float, default=4.0,
                   help="size of the disk write baseline (>= 4 to beat the page cache)")
    p.add_argument("--pynwb-gib", type=float, help="data written by the pynwb baseline (default 2, quick 0.5)")
    p.add_argument("--finalize-seconds", type=float,
                   help="recording length of the 1x finalize session (default 10, quick 5)")
    p.add_argument("--slow-seconds", type=float, help="recording length of each slow-stream run (default 60, quick 30)")
    p.add_argument("--slow-baseline", help="an acqd package folder measured alternately with the current code "
                                          "in the slow scenario (before vs after)")
    p.add_argument("--many-seconds", type=float, help="RECORD window of each many-streams run (default 60, quick 20)")
    p.add_argument("--preview-window", type=float, help="seconds measured per preview window (default 60, quick 20)")
    p.add_argument("--preview-acquire", action="store_true",
                   help="preview scenario in ACQUIRE (nothing stored): the same writers' work without ~150 MB/s to disk")
    p.add_argument("--synclock-window", type=float, help="seconds measured per synclock window (default 60, quick 20)")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period")
    p.add_argument("--rss-limit-mb", type=int, default=RSS_LIMIT_MB,
                   help="cut a run short when a process (e.g. the simulator's send queues) grows past this")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="before each run, wait up to this long for other processes to quieten")
    p.add_argument("--workdir", help="where sockets and recordings go (default a fresh folder under bench-data/)")
    p.add_argument("--keep", action="store_true", help="keep the recorded sessions")
    p.add_argument("--acqd", help="run the daemon, writers and simulator from the acqd package in this folder "
                                  "(a prototype copy) instead of the installed one")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--doc", help="performance doc to update (default docs/performance.md; quick runs: none)")
    p.add_argument("--no-doc", action="store_true", help="do not update any doc")
    p.add_argument("--update", metavar="JSON", help="an earlier --out result: rerun only --scenarios into it "
                                                    "(the rest is kept) and write the doc from the whole")
    a = p.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat or (1 if q else 3)
    a.repeat_reference = a.repeat_reference or a.repeat
    a.repeat_finalize = a.repeat_finalize or a.repeat
    a.daemon = {"flush_interval_s": a.flush_interval} if a.flush_interval else {}
    a.stream = {"max_file_seconds": a.part_seconds} if a.part_seconds else {}
    a.seconds = a.seconds or (30.0 if q else 300.0)
    a.step_seconds = a.step_seconds or (10.0 if q else 20.0)
    a.slow_seconds = a.slow_seconds or (30.0 if q else 60.0)
    a.many_seconds = a.many_seconds or (20.0 if q else 60.0)
    a.pynwb_gib = a.pynwb_gib or (0.5 if q else 2.0)
    a.finalize_seconds = a.finalize_seconds or (5.0 if q else 10.0)
    a.ramp_compression = [c for c in a.ramp_compression.split(",") if c]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    unknown = set(a.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    a.doc = None if a.no_doc else Path(a.doc) if a.doc else (None if q else DOC)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.acqd:  # every subprocess (daemon, writers, simulator, receiver) imports acqd from there
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.acqd).resolve()),
                                                                  os.environ.get("PYTHONPATH")]))
        args.out = args.out and str(Path(args.out).resolve())
        args.doc = args.doc and Path(args.doc).resolve()
        os.chdir(tempfile.gettempdir())  # `python -m` puts the working directory first: not the repo's acqd
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    (ROOT / "bench-data").mkdir(exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / "bench-data"))
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"started": started.isoformat(timespec="seconds"),
                 "command": "scripts/bench " + " ".join(sys.argv[1:] if argv is None else argv),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "machine": machine_info(workdir),
                 "acqd_at_start": code_fingerprint()}
    update = None
    if args.update:  # rerun some scenarios into an earlier result: the rest of it is kept as it was
        update = {"started": res["started"], "command": res["command"], "scenarios": args.scenarios,
                  "acqd": res["acqd_at_start"]}
        res = json.loads(Path(args.update).read_text())
        res["updates"] = [*res.get("updates", []), update]
    runners = {"reference": scenario_reference, "ramp": scenario_ramp, "naive": scenario_naive,
               "disk": scenario_disk, "pynwb": scenario_pynwb, "finalize": scenario_finalize,
               "preview": scenario_preview, "slow": scenario_slow, "ship": scenario_ship, "synclock": scenario_synclock,
               "many": scenario_many, "hasher": scenario_hasher}
    try:
        for name in SCENARIOS:
            if name in args.scenarios:
                res[name] = runners[name](args, workdir)
                if args.out:  # what is done survives a run that is stopped halfway
                    Path(args.out).write_text(json.dumps(res, indent=1, default=to_json))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if update is None:
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        res["acqd_at_end"] = code_fingerprint()
    else:
        update["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["targets"] = targets(res)
    text = json.dumps(res, indent=1, default=to_json)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print("\n" + markdown(res))
    if args.doc:
        write_doc(args.doc, res)
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
