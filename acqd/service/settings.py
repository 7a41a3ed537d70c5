"""Service settings from the environment and secret files, over the rig YAML (pydantic-settings).

So that Docker and systemd need no edited YAML: ``ACQD_CONFIG``, ``ACQD_HOST``, ``ACQD_PORT``, ``ACQD_TOKEN``,
``ACQD_TOKEN_FILE``, ``ACQD_DATA_ROOT``. A secret file named ``acqd_token`` in ``$CREDENTIALS_DIRECTORY``
(systemd ``LoadCredential=``) or ``/run/secrets`` (Docker secrets) also sets the token. Precedence:
command-line flag > environment > secret file > YAML.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from acqd.config import ControlConfig, RigConfig
from acqd.errors import ConfigError


def _secrets_dir() -> str | None:
    for d in (os.environ.get("CREDENTIALS_DIRECTORY"), "/run/secrets"):
        if d and Path(d).is_dir():
            return d
    return None


class ServiceSettings(BaseSettings):
    """What the environment may set (``ACQD_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="ACQD_", extra="ignore")

    config: Path | None = None
    """The rig YAML (instead of ``--config``)."""
    host: str | None = None
    """control.host."""
    port: int | None = None
    """control.port."""
    token: str | None = None
    """control.token."""
    token_file: Path | None = None
    """A file holding control.token (its first line)."""
    data_root: Path | None = None
    """daemon.data_root."""

    @classmethod
    def load(cls) -> ServiceSettings:
        return cls(_secrets_dir=_secrets_dir())


def apply_settings(cfg: RigConfig, s: ServiceSettings) -> RigConfig:
    """``cfg`` with the settings that are set; the control section is validated again (token off loopback)."""
    token = s.token
    if s.token_file is not None:
        try:
            token = s.token_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise ConfigError(f"ACQD_TOKEN_FILE {s.token_file}: cannot read a token: {e}") from None
    control = {k: v for k, v in (("host", s.host), ("port", s.port), ("token", token)) if v is not None}
    daemon: dict = {}
    if control:
        try:
            daemon["control"] = ControlConfig.model_validate({**cfg.daemon.control.model_dump(), **control})
        except ValueError as e:
            raise ConfigError(f"settings from the environment: {e}") from None
    if s.data_root is not None:
        daemon["data_root"] = s.data_root.resolve()
    if not daemon:
        return cfg
    return cfg.model_copy(update={"daemon": cfg.daemon.model_copy(update=daemon)})
