"""The daemon: modes, writer processes, sessions, jobs, and the protocols clients speak to it.

The daemon itself, here:

- ``supervisor``: the mode/session state machine (IDLE, ACQUIRE, RECORD), RECORD's preflight, incidents; it drives
  ``writers`` (the writer processes: spawn, commands, heartbeats, restarts, reconcile, stop), ``sessionrecord``
  (session.json of the open session, recovery of interrupted ones), ``jobs`` (finalize and export runs and their
  progress), ``disk`` (the free-space reserve), ``calls`` (work other threads hand to its thread);
- ``live`` and ``snapshot``: the published status snapshot, its verdict and the event bus;
- ``commands``: the one command table behind the HTTP API and the CLI; ``annotations``: timestamped notes;
- ``hashing`` (closed parts hashed while recording), ``previews`` (the console's live preview hub), ``lslbridges``
  (LSL outlets recorded as streams), ``runtime`` (the runtime folder, per-rig and data-root locks),
  ``settings`` (ACQD_* environment), ``systemd`` (notify, watchdog), ``procs`` (acqd's own processes, for the
  demo and tests), ``status`` (health rendered for people);
- ``daemon``: the ``acqd serve`` process main (logging, uvicorn, signals), the one module that joins the daemon
  and ``http``.

``http/`` holds every protocol a client speaks (the FastAPI app, the console, Open Ephys, LabRecorder, SSE,
Prometheus). Imports: anything below the service (root modules, wire, record, finalize, share, sim); ``http``
imports the daemon, never the reverse (only ``daemon`` imports ``http``); nothing imports the service but the CLI
and the demo (the client for scripts is ``acqd.client``).
"""
