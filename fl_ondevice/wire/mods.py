"""The clients' Flower mods (``client.mods``), built by every ClientApp for its run and once by
the server, so that a bad one fails before any engine starts instead of on every worker."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate

from fl_ondevice.config import Config
from fl_ondevice.errors import ConfigError


def client_mods(cfg: Config) -> list[Any]:
    """``cfg.client.mods`` built with Hydra, outermost first; ``ConfigError`` names a mod that
    cannot be built and why."""
    mods = []
    for name, node in cfg.client.mods.items():
        try:
            mods.append(instantiate(node, _convert_="all"))
        except Exception as err:  # noqa: BLE001 - Hydra wraps the cause; say which mod
            cause = err.__cause__ or err
            raise ConfigError(f"client.mods.{name} cannot be built: {cause}") from None
    return mods
