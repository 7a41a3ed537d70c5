"""What leaves the rig: the self-contained NWB export for DANDI, and analysis files linking sealed data.

Imports: the root modules, ``record`` and ``finalize`` (a shared session is a finalized one); never service.
"""
