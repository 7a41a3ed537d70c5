"""The exception tree of acqd.

    AcqdError                 anything acqd raises on purpose
     ├── ConfigError          a config file or request that cannot be accepted (precise message)
     ├── ProtocolError        a wire message that breaks docs/protocol.md
     ├── SessionError         a session or stream name or state that is refused
     ├── WriterError          a writer cannot append or flush its stream file
     │    └── DiskFullError   ENOSPC / EFBIG: the stream stops, committed data stays readable
     ├── FinalizeError        a session cannot be finalized (nothing is sealed)
     │    └── ClockFitError   a stream's clock cannot be aligned (ambiguous pairing, too few edges)
     ├── ExportError          a session cannot be exported (nothing written under its final name)
     └── AnalysisError        an analysis file cannot be created, or read back with every link resolved
    MetadataError (ValueError)  session metadata that cannot be accepted (acqd.metadata raises it; here so that
                                the CLI catches it without importing the metadata models)

A sequence gap is a recorded event, not an exception: a dropped message never stops a recording.
"""


class AcqdError(Exception):
    """Base class of every error acqd raises on purpose."""


class ConfigError(AcqdError):
    """A config file or request that cannot be accepted."""


class ProtocolError(AcqdError):
    """A wire message that does not follow docs/protocol.md."""


class SessionError(AcqdError):
    """A session or stream name or state transition that is refused."""


class WriterError(AcqdError):
    """A writer cannot append to or flush its stream file."""


class DiskFullError(WriterError):
    """The disk (or the file size limit) is full: the stream stops with its committed data intact."""


class FinalizeError(AcqdError):
    """A session cannot be finalized; nothing has been sealed."""


class ClockFitError(FinalizeError):
    """A stream's clock cannot be aligned to the reference."""


class ExportError(AcqdError):
    """A session cannot be exported; nothing was written under its final name."""


class AnalysisError(AcqdError):
    """An analysis file cannot be created, or read back with every link resolved."""


class MetadataError(ValueError):
    """Metadata that cannot be accepted; the message names the key path."""

    problems: list[dict] = []
    """nwbinspector findings (field, check, importance, message) when they are the reason."""
