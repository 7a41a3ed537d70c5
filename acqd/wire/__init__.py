"""The wire protocol and what speaks it from the driver side.

``protocol`` encodes and decodes the multipart message (docs/protocol.md); ``publisher`` is the reference
driver. Imports: the root modules only (``errors``, ``config``); never record, service, finalize or share.
"""
