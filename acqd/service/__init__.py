"""The daemon: modes, writer processes, the control API and status.

``supervisor`` owns the session state machine and the writers; ``commands`` is the one command table behind
the HTTP API (``api``) and the CLI; ``status`` renders health; ``procs`` runs acqd's own processes.
Imports: anything below it (root modules, wire, record, finalize, share); nothing imports it but the CLI.
"""
