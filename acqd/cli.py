"""The ``acqd`` command line: the daemon, its client commands, and offline tools.

    acqd serve --config FILE             run the daemon (control API, writers)
    acqd status | acquire | record | stop   control a running daemon (same commands as the API)
    acqd annotate TEXT                   a timestamped note in the recording
    acqd check-config FILE               validate a rig file, print precise errors
    acqd config-schema [--markdown]      the rig config's JSON Schema (or docs/config.md)
    acqd simulate --config FILE          publish the rig's streams from simulated devices
    acqd demo                            daemon + simulated rig + a short recording, end to end
    acqd finalize SESSION_DIR            clock fits, master NWB, validation, QC, seal (docs/finalize.md)
    acqd verify SESSION_DIR              check a finalized session against its manifest
    acqd amend SESSION_DIR --set F=V     change a recorded session's metadata (docs/finalize.md "Amend")
    acqd lsl list                        LSL outlets visible now, with a config snippet for each (docs/lsl.md)
    acqd attach SESSION_DIR FILE         attach a photo (rig, subject) to a session before finalize
    acqd export SESSION_DIR --out DIR    one self-contained NWB file (+ videos) laid out for DANDI (docs/export.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acqd.errors import AcqdError, ConfigError, MetadataError
from acqd.service.logs import FORMATS

DEFAULT_URL = "http://127.0.0.1:8600"


def _load(path: str | Path, data_root: str | None = None):
    """The rig config, its data root from ``--data-root``, else ``ACQD_DATA_ROOT``, else the file."""
    from acqd.config import load_config  # pydantic models and numpy: not for the client commands nor --help

    return load_config(path, data_root or os.environ.get("ACQD_DATA_ROOT") or None)


def _config(args: argparse.Namespace, settings=None):
    cfg = _load(args.config, getattr(args, "data_root", None))
    if settings is not None:  # environment and secret files, under the command-line flags below
        from acqd.service.settings import apply_settings

        cfg = apply_settings(cfg, settings)
    if getattr(args, "data_root", None):
        cfg = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(
            update={"data_root": Path(args.data_root).resolve()})})
    if getattr(args, "port", None) is not None:
        control = cfg.daemon.control.model_copy(update={"port": args.port})
        cfg = cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update={"control": control})})
    return cfg


def _client(args: argparse.Namespace):
    from acqd.client import Client

    return Client(args.url or os.environ.get("ACQD_URL", DEFAULT_URL), args.token or os.environ.get("ACQD_TOKEN"))


def cmd_serve(args: argparse.Namespace) -> int:
    from acqd.startup import importing

    with importing():  # the daemon's imports are most of its start-up (acqd.startup)
        from acqd.config.ports import check_ports_free
        from acqd.service.daemon import serve
        from acqd.service.settings import ServiceSettings

    settings = ServiceSettings.load()
    args.config = args.config or settings.config
    if args.config is None:
        raise ConfigError("no rig config: pass --config FILE or set ACQD_CONFIG")
    settings.config = None
    cfg = _config(args, settings)
    check_ports_free(cfg, ("acqd",))  # one clear line, not a traceback from the HTTP server or a writer
    return serve(cfg, ready_file=args.ready_file, acquire=args.acquire, log_format=args.log_format)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    print(f"{args.file}: OK — {len(cfg.streams)} streams, reference {cfg.reference!r}, data root {cfg.daemon.data_root}")
    for s in cfg.streams:
        sync = s.sync.source if s.sync else ("LSL timestamps" if s.lsl else "host time")
        print(f"  {s.name:12s} {s.kind:7s} {s.dtype}{list(s.shape)} @ {s.rate:g} Hz  "
              f"{s.sample_bytes * s.rate / 1e6:7.2f} MB/s  sync: {sync}  {s.socket} {s.endpoint}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from acqd.config.doc import markdown, schema_text

    sys.stdout.write(markdown() if args.markdown else schema_text())
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from acqd.service.status import print_status, watch_status

    client = _client(args)
    body: dict = {}
    if args.command == "record" and args.prepare:  # for the next start from a script (Open Ephys, LabRecorder)
        result = client.command("recording", metadata=_metadata_args(args) or {})
        print(json.dumps(result, indent=2) if args.json else f"the next session started by a script (Open Ephys, "
              f"LabRecorder) records with: {json.dumps(result['metadata'])}")
        return 0
    if args.command == "record":
        from acqd.metadata import parse_bids  # the metadata models: only for the command that sends metadata

        body = {"session": args.session, "metadata": _metadata_args(args),
                "bids": parse_bids(args.bids) if args.bids else None}
    elif args.command == "stop":
        body = {"idle": args.idle}
    elif args.command == "annotate":
        body = {"text": args.text}
    if args.command == "status" and args.watch:
        return watch_status(lambda: client.command("status"), args.watch)
    result = client.command(args.command, **body)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "annotate":
        sample = result["reference_sample"]
        print(f"annotated at {result['taken_at']}" + (f" ({result['reference']} sample {sample})" if sample is not None
                                                    else "") + (f" in session {result['session']}"
                                                                if result["session"] else " (no session: data root)"))
    else:
        print_status(result)
    return 0


def _metadata_args(args: argparse.Namespace) -> dict | None:
    from acqd.metadata import load_path

    meta = load_path(args.metadata) if args.metadata else {}
    subject = {k: v for k in ("subject_id", "species", "sex", "age") if (v := getattr(args, k)) is not None}
    if subject:
        meta.setdefault("subject", {}).update(subject)
    if args.description:
        meta["session_description"] = args.description
    return meta or None


def cmd_simulate(args: argparse.Namespace) -> int:
    import signal

    from acqd.config.ports import check_ports_free
    from acqd.sim.simulate import Rig, SimParams, parse_fault, run, write_truth

    cfg = _load(args.config)
    check_ports_free(cfg, ("drivers",), control=False)
    rig = Rig(cfg, SimParams(seed=args.seed, seconds=args.seconds, max_ppm=args.max_ppm, wander_ppm=args.wander_ppm,
                             sync=args.sync, sync_period_s=args.sync_period, ppm=args.ppm,
                             t0_monotonic=args.t0_monotonic))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        faults = [parse_fault(f) for f in args.fault]
        for f in faults:
            rig.check_fault(f)
    except ValueError as e:
        raise ConfigError(f"--fault: {e}") from None
    result = run(rig, args.seconds, faults, wait_for_peers_s=args.wait_peers,
                 on_ready=lambda: print("simulate: publishing", flush=True), should_stop=lambda: bool(stop))
    if args.truth:
        write_truth(Path(args.truth), rig, result)
    print(f"simulate: done, sent {sum(s['messages'] for s in result['sent'].values())} messages", flush=True)
    return 0


def cmd_lsl_list(args: argparse.Namespace) -> int:
    import yaml

    from acqd.wire.lsldiscover import discovery

    found = discovery(args.wait)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for o in found["outlets"]:
        print(f"{o['name']!r} type {o['type']!r} source_id {o['source_id']!r}: {o['channels']} x {o['format']} @ "
              f"{o['rate']:g} Hz on {o['hostname']}")
        print("  " + yaml.safe_dump([o["config"]], sort_keys=False).replace("\n", "\n  ").rstrip())
    print(f"{len(found['outlets'])} LSL outlet(s) visible", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from acqd.demo import demo

    return demo(Path(args.config), Path(args.data_root), args.seconds)


def _run_job(args: argparse.Namespace, name: str, run: Callable[[Callable[[str, float], None]], Any],
             summary: Callable[[dict], list[str]]) -> int:
    """Run a long job (finalize, export) with a progress bar, or with JSON lines for the daemon."""
    if args.progress_jsonl:  # progress lines, then the report (or the error), on stdout
        def progress(stage: str, done: float) -> None:
            print(json.dumps({"stage": stage, "fraction": round(done, 4)}), flush=True)

        try:
            report = run(progress)
        except AcqdError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            return 2
        print(json.dumps({"report": report.to_dict()}, default=str), flush=True)
        return 0
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(name, total=1.0)
        report = run(lambda stage, done: bar.update(task, completed=done, description=stage))
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else "\n".join(summary(report.to_dict())))
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from acqd.finalize import finalize_session
    from acqd.finalize.qc import summary_lines

    return _run_job(args, "finalize", lambda progress: finalize_session(
        Path(args.session_dir), progress, accept_corrupt=args.accept_corrupt, wait_nodes_s=args.wait_nodes),
        summary_lines)


def cmd_verify(args: argparse.Namespace) -> int:
    """Scrub a finalized session: every sealed byte read again against the manifest (session.json included) and
    every chunk against its checksum; the session is then marked verified, or exit 1 listing what differs. An
    amend that was killed is finished first (rolled forward or back), and said so."""
    from acqd.finalize import recover_amend
    from acqd.finalize.scrub import scrub_session

    from acqd.share.ship.verify import shipped_copies

    recovered = recover_amend(Path(args.session_dir))
    if recovered:
        print(f"{args.session_dir}: {recovered}")
    record = scrub_session(Path(args.session_dir))
    problems = [i["detail"] for i in record["incidents"]]
    print("\n".join(problems) if problems else
          f"{args.session_dir}: verified: {record['files']} files ({record['bytes'] / 1e6:.1f} MB) read again, "
          f"{record['chunks_checked']} chunks checked, nothing changed")
    if record["not_recorded"]:
        print(f"acqd: warning: {record['not_recorded']}: the session is not marked verified", file=sys.stderr)
    for c in shipped_copies(Path(args.session_dir)):  # shipping.json: verified copies elsewhere (docs/shipping.md)
        print(f"verified copy at {c['destination']}: {c['path']} ({c['verified_at']}, manifest sha256 "
              f"{c['manifest_sha256'][:12]}...)")
    return 1 if problems else 0


def cmd_amend(args: argparse.Namespace) -> int:
    """Merge --metadata FILE and --set edits over a recorded session's metadata; print what changed."""
    from acqd.metadata import load_path, merge, parse_set, to_acqd

    update = load_path(args.metadata) if args.metadata else {}
    update = merge(update, to_acqd(parse_set(args.set), "--set"))
    if not update:
        raise ConfigError("nothing to amend: give --metadata FILE and/or --set FIELD=VALUE")
    from acqd.finalize.amend import amend_session, default_who  # after the edits parse: it imports pynwb (~1 s)

    result = amend_session(Path(args.session_dir), update, args.who or default_who())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("\n".join([f"amended {args.session_dir} ({result['who']}, {result['when']}):", *(
        f"  {line}" for line in result["what"])]) if result["what"] else "nothing changed")
    if result.get("master_sha256"):
        print(f"  master rewritten: sha256 {result['previous_master_sha256'][:12]}... -> "
              f"{result['master_sha256'][:12]}... (manifest updated)")
        print("  exports made before this amendment are stale: `acqd export` into the same folder rebuilds them")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    """Copy an image into the session folder's attachments/ (before finalize); it lands in the master NWB."""
    from acqd.images import attach

    meta = attach(Path(args.session_dir), Path(args.file), args.description, args.resolution)
    print(json.dumps(meta, indent=2) if args.json else
          f"attached {meta['name']} ({'x'.join(map(str, meta['shape']))}) to {Path(args.session_dir).name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from acqd.share.export import export_session

    def summary(r: dict) -> list[str]:
        return [f"{'rebuilt the stale export of' if r.get('replaced') else 'exported'} {r['session_id']} to "
                f"{Path(r['out']) / r['nwb']} ({r['bytes'] / 1e6:.1f} MB, {len(r['videos'])} video files) in "
                f"{r['seconds']:.1f} s",
                *(f"  {m['importance']}: {m['check']}: {m['message']}" for m in r["check"]["inspector"])]

    return _run_job(args, "export", lambda progress: export_session(
        Path(args.session_dir), Path(args.out), progress, gzip_level=args.gzip_level), summary)


def cmd_ship(args: argparse.Namespace) -> int:
    """Queue a session for shipping, or show, retry or re-verify the ship queue's jobs (through the daemon)."""
    from acqd.service.shipping import status_lines

    client = _client(args)
    if args.retry is not None or args.reverify is not None:
        op, job_id = ("ship_retry", args.retry) if args.retry is not None else ("ship_reverify", args.reverify)
        result = client.command(op, id=job_id)
    elif args.session and not (args.status or args.dry_run):
        result = client.command("ship", session=Path(args.session).name, to=args.to)
    else:
        result = client.command("ship_status")
    if args.json:
        print(json.dumps(result, indent=2))
    elif "destinations" in result:
        print("\n".join(status_lines(result, deletions=args.dry_run)))
    else:
        print("\n".join(status_lines({"jobs": result["jobs"], "destinations": [], "verified": 0, "failed": 0,
                                       "queued_bytes": 0})[:-1]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acqd", description="streaming acquisition daemon for neuroscience rigs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="the rig YAML (default $ACQD_CONFIG)")
    s.add_argument("--data-root", help="override daemon.data_root")
    s.add_argument("--port", type=int, help="override control.port (0: any free port)")
    s.add_argument("--ready-file", help="write {url, pid} here once the API is up")
    s.add_argument("--acquire", action="store_true", help="start acquiring at once (systemd READY after the writers)")
    s.add_argument("--log-format", choices=FORMATS, default=os.environ.get("ACQD_LOG_FORMAT", "auto"),
                   help="text on a terminal, journal under systemd, else json (auto, the default; $ACQD_LOG_FORMAT)")
    s.set_defaults(fn=cmd_serve)

    for name, text in (("status", "show mode, session and stream health"), ("acquire", "start receiving"),
                       ("record", "start recording a session"), ("stop", "stop recording, or acquiring"),
                       ("annotate", "put a timestamped note into the recording")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--url", help=f"daemon URL (default $ACQD_URL or {DEFAULT_URL})")
        c.add_argument("--token", help="API token (default $ACQD_TOKEN)")
        c.add_argument("--json", action="store_true", help="print the raw JSON reply")
        if name == "record":
            c.add_argument("--session", help="session folder name (default: a timestamp)")
            c.add_argument("--prepare", action="store_true", help="do not start: keep this metadata for the next "
                           "session a script starts (Open Ephys RECORD, LabRecorder start)")
            c.add_argument("--metadata", help="YAML file of session metadata")
            c.add_argument("--description", help="session description")
            c.add_argument("--bids", metavar="sub=M12,ses=3,...",
                           help="BIDS entities (sub, ses, task, acq, run): name the session folder and the export")
            for field in ("subject_id", "species", "sex", "age"):
                c.add_argument(f"--{field.replace('_', '-')}", dest=field)
        if name == "stop":
            c.add_argument("--idle", action="store_true", help="stop acquiring too (-> IDLE)")
        if name == "annotate":
            c.add_argument("text", help="the note, e.g. 'drug on'")
        if name == "status":
            c.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                           help="refresh every SECONDS (default 1) until Ctrl-C")
        c.set_defaults(fn=cmd_client)

    c = sub.add_parser("ship", help="ship a finalized session to the rig config's destinations (docs/shipping.md)")
    c.add_argument("session", nargs="?", help="session folder or name to queue")
    c.add_argument("--to", metavar="NAME", help="only this destination (default: every one)")
    c.add_argument("--status", action="store_true", help="show the queue: jobs, progress, rates, ETA, failures")
    c.add_argument("--retry", type=int, metavar="ID", help="queue a failed job again")
    c.add_argument("--reverify", type=int, metavar="ID", help="hash a verified copy at its destination again")
    c.add_argument("--dry-run", action="store_true", help="list which sessions delete_after would delete, and why")
    c.add_argument("--url", help=f"daemon URL (default $ACQD_URL or {DEFAULT_URL})")
    c.add_argument("--token", help="API token (default $ACQD_TOKEN)")
    c.add_argument("--json", action="store_true", help="print the raw JSON reply")
    c.set_defaults(fn=cmd_ship)

    c = sub.add_parser("check-config", help="validate a rig config file")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)

    c = sub.add_parser("config-schema", help="print the rig config's JSON Schema (or its reference page)")
    c.add_argument("--markdown", action="store_true", help="print docs/config.md instead")
    c.set_defaults(fn=cmd_config_schema)

    m = sub.add_parser("simulate", help="publish the rig's streams from simulated devices")
    m.add_argument("--config", required=True)
    m.add_argument("--seconds", type=float, default=3600.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-ppm", type=float, default=30.0, help="crystal error range of the devices")
    m.add_argument("--wander-ppm", type=float, default=0.0, help="thermal wander amplitude")
    m.add_argument("--sync", choices=("random", "regular", "barcode"), default="random",
                   help="sync scheme: random intervals, a regular square wave, or barcodes")
    m.add_argument("--sync-period", type=float, default=1.0, help="period of the regular square wave (s)")
    m.add_argument("--ppm", type=float, help="every device's crystal error (ppm) instead of a draw")
    m.add_argument("--t0-monotonic", type=float, metavar="SECONDS",
                   help="true time 0 on CLOCK_MONOTONIC, shared by the simulators of a multi-PC rig (with one "
                        "--seed they latch one sync line); --seconds counts from it")
    m.add_argument("--fault", action="append", default=[], metavar="STREAM:KIND:SEQ",
                   help="inject a fault (drop, duplicate, reorder, malformed, oversized, wrong_dtype, wrong_shape, "
                        "size_mismatch, wrong_frames, restart); or sync_off:STREAM:START_S:DURATION_S: the stream "
                        "latches no sync edge for that long (a pulled cable)")
    m.add_argument("--wait-peers", type=float, default=30.0, help="wait this long for acqd to connect")
    m.add_argument("--truth", help="write the ground truth (clocks, pulses, faults) to this JSON file")
    m.set_defaults(fn=cmd_simulate)

    f = sub.add_parser("finalize", help="align clocks, write the master NWB, validate and seal a closed session")
    f.add_argument("session_dir")
    f.add_argument("--json", action="store_true", help="print the full report as JSON")
    f.add_argument("--progress-jsonl", action="store_true", help="print progress and the report as JSON lines")
    f.add_argument("--accept-corrupt", action="store_true",
                   help="seal even if chunks fail their checksum (they are listed in the report and qc.json)")
    f.add_argument("--wait-nodes", type=float, default=None, metavar="SECONDS",
                   help="a multi-PC session: wait this long for the other PCs' parts (default: the session config's "
                        "daemon.nodes_timeout_s); missing ones are listed, finalize again once they arrive")
    f.set_defaults(fn=cmd_finalize)

    v = sub.add_parser("verify", help="read a finalized session again against its manifest (session.json included) "
                                      "and its chunk checksums; mark it verified")
    v.add_argument("session_dir")
    v.set_defaults(fn=cmd_verify)

    a = sub.add_parser("amend", help="change the metadata of a closed, interrupted or finalized session")
    a.add_argument("session_dir")
    a.add_argument("--metadata", help="YAML file of metadata to merge (acqd's or neuroconv's layout)")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="one field, e.g. subject.species='Mus musculus' (repeat; [a, b] for a list)")
    a.add_argument("--who", help="who amends (default user@host)")
    a.add_argument("--json", action="store_true", help="print the amendment as JSON")
    a.set_defaults(fn=cmd_amend)

    a = sub.add_parser("attach", help="attach a photo (rig, subject, craniotomy) to a session before finalize")
    a.add_argument("session_dir")
    a.add_argument("file", help="the image (PNG, JPEG, TIFF ...)")
    a.add_argument("--description", required=True, help="what the image shows")
    a.add_argument("--resolution", type=float, metavar="PIXELS_PER_CM", help="pixels per cm, when known")
    a.add_argument("--json", action="store_true", help="print the attachment's record as JSON")
    a.set_defaults(fn=cmd_attach)

    e = sub.add_parser("export", help="write a finalized session as one self-contained NWB file laid out for DANDI")
    e.add_argument("session_dir")
    e.add_argument("--out", required=True, help="folder to export into (e.g. a dandiset folder)")
    e.add_argument("--gzip-level", type=int, default=4, choices=range(1, 10), metavar="1-9",
                   help="gzip level of the data (default 4)")
    e.add_argument("--json", action="store_true", help="print the full report as JSON")
    e.add_argument("--progress-jsonl", action="store_true", help="print progress and the report as JSON lines")
    e.set_defaults(fn=cmd_export)

    lsl = sub.add_parser("lsl", help="Lab Streaming Layer tools").add_subparsers(dest="lsl_command", required=True)
    ll = lsl.add_parser("list", help="list the LSL outlets visible now, with a config snippet for each")
    ll.add_argument("--wait", type=float, default=1.0, help="how long to look (s)")
    ll.add_argument("--json", action="store_true", help="print JSON")
    ll.set_defaults(fn=cmd_lsl_list)

    d = sub.add_parser("demo", help="run the daemon and a simulated rig, record, summarise")
    d.add_argument("--config", default="configs/rig.yaml")
    d.add_argument("--data-root", default="demo-data")
    d.add_argument("--seconds", type=float, default=20.0)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # One OpenBLAS thread, before anything imports numpy; the daemon's children (writers, hasher, shipping)
    # inherit it. acqd's numpy work is elementwise or on small arrays, which BLAS threads do not speed up, and
    # numpy's import starts one thread per core in every process: ~0.1 s of CPU at each start (0.41 -> 0.29 s
    # for a writer's imports) and idle threads beside the writers. A value already set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (AcqdError, MetadataError) as e:
        print(f"acqd: error: {e}", file=sys.stderr)
        return 3 if type(e).__name__ == "DaemonUnreachable" else 2  # 3: no daemon to talk to


if __name__ == "__main__":
    sys.exit(main())
