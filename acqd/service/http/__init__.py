"""Every protocol a client speaks to the daemon.

``app`` builds the FastAPI app from the routers: ``commands`` (``POST /api/commands/<name>``, and the answers every
route gives: ``error``, ``answer``, ``snapshot_response``), ``openephys`` (the Open Ephys GUI's HTTP remote
control), ``events`` (Server-Sent Events), ``metrics`` (Prometheus), ``console`` (the web page, served from
``web/``); ``guard`` checks Host, Origin, token and bodies before any route runs; ``labrecorder`` is LabRecorder's
TCP remote control. docs/control-api.md is the reference.
Imports: the daemon (``acqd.service``: supervisor, commands, live, previews) and anything below it; no module of
the daemon imports this package but ``acqd.service.daemon`` (the process main).
"""
