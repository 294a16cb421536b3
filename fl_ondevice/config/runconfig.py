"""The one translation between Config and Flower's flat, kebab-case run config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any, get_args, get_type_hints

from flwr.common.config import flatten_dict, unflatten_dict

from fl_ondevice.config.schema import Config, parse_config


def to_run_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """The one translation to Flower's flat, kebab-case run config (``client.batch-size``).

    Nulls become ``""`` and lists of ints ``"5,6,7"`` (Flower's run config holds scalars only);
    :func:`from_run_config` inverts this.
    """
    return {_kebab(k): v for k, v in flatten_dict(_no_nulls(asdict(cfg))).items()}


def from_run_config(flat: Mapping[str, Any]) -> Config:
    """Rebuild and validate a :class:`Config` from :func:`to_run_config`'s output."""
    nested = unflatten_dict({k.replace("-", "_"): v for k, v in flat.items()})
    return parse_config(_nulls(nested, Config))


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def _no_nulls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _no_nulls(v) for k, v in node.items()}
    if isinstance(node, list):
        return ",".join(str(int(v)) for v in node)
    return "" if node is None else node


def _nulls(node: dict[str, Any], cls: type | None) -> dict[str, Any]:
    # "" back to None: for fields typed `X | None`, and anywhere in the free-form nodes
    # (strategy arguments, mods), where no argument takes an empty string.
    hints = get_type_hints(cls) if cls is not None else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        sub = _dataclass_of(hints.get(key))
        if isinstance(value, dict):
            out[key] = _nulls(value, sub)
        elif value == "" and (cls is None or type(None) in get_args(hints.get(key))):
            out[key] = None
        elif isinstance(value, str) and _is_int_list(hints.get(key)):
            out[key] = [int(v) for v in value.split(",") if v]
        else:
            out[key] = value
    return out


def _is_int_list(hint: Any) -> bool:
    return hint == list[int] or list[int] in get_args(hint)


def _dataclass_of(hint: Any) -> type | None:
    return hint if isinstance(hint, type) and is_dataclass(hint) else None
