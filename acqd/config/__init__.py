"""The rig config: what a valid rig file is, and the tools around it.

``models`` holds the pydantic models and ``load_config`` (a YAML file -> a frozen ``RigConfig``, or one
``ConfigError`` listing every problem with its line:column); ``errors`` words and locates those problems;
``doc`` generates the JSON Schema and docs/config.md; ``ports`` checks the tcp ports a config will bind.
The public names of ``models`` are re-exported here (``from acqd.config import RigConfig``).
Imports: ``acqd.errors`` and ``acqd.metadata`` (a config carries default session metadata); nothing else of acqd.
"""

from acqd.config.models import (NAME_PATTERN, STREAM_NAME_BYTES, ChannelSync, Compression, ControlConfig,
                                DaemonConfig, EdgeLine, FrameSync, LabRecorderConfig, LslSource, ProbeConfig,
                                QcConfig, RigConfig, StimulusConfig, StreamConfig, StrobeSync, SyncSource,
                                VideoConfig, check_name, electrode_columns, is_loopback, load_config, parse_config,
                                rig_problems, stimulus_problem)
from acqd.config.nodes import Follower

__all__ = ["NAME_PATTERN", "STREAM_NAME_BYTES", "ChannelSync", "Compression", "ControlConfig", "DaemonConfig",
           "EdgeLine", "Follower", "FrameSync", "LabRecorderConfig", "LslSource", "ProbeConfig", "QcConfig", "RigConfig",
           "StimulusConfig", "StreamConfig", "StrobeSync", "SyncSource", "VideoConfig", "check_name",
           "electrode_columns", "is_loopback", "load_config", "parse_config", "rig_problems", "stimulus_problem"]
