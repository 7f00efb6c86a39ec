"""Reading dask config ``zcache.*``: the package defaults, and a cache's settings from them.

Importing this module registers the defaults of ``zcache.yaml`` (beside it) with
``dask.config.update_defaults``. `kwargs_from_dask_config` turns the current dask
config (top-level ``zcache.*`` keys, or a named cache under ``zcache.caches``) into
`~xarray_zcache.config.CacheConfig` keyword arguments.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import dask.config
import yaml

from xarray_zcache.config_checks import _FIELD_OF, _env_var_of, default_disk_path

__all__ = ["kwargs_from_dask_config"]

_YAML = pathlib.Path(__file__).with_name("zcache.yaml")
with _YAML.open() as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)
dask.config.update_defaults(_DEFAULTS)


def kwargs_from_dask_config(name: str | None = None) -> dict[str, Any]:
    """`CacheConfig` keyword arguments from dask config ``zcache.*``.

    ``name``: a named configuration under ``zcache.caches``, whose keys override the
    top-level ones; ``None`` (or the top-level name) gives the top-level settings.
    Raises ``ValueError`` for an unknown name or an unknown setting.
    """
    base: dict[str, Any] = dict(dask.config.get("zcache", default={}) or {})
    caches = base.pop("caches", None) or {}
    if name is not None and name != base.get("name", "default"):
        if name not in caches:
            known = ", ".join(map(repr, sorted(caches))) or "none configured"
            raise ValueError(
                f"cache_config: unknown cache name {name!r}; expected a CacheConfig or one "
                f"of the names under dask config 'zcache.caches' ({known})"
            )
        base = _merge(base, {"name": name, **dict(caches[name] or {})})
    return _kwargs_from_mapping(base)


def _cfg(key: str) -> Any:
    return dask.config.get(f"zcache.{key}")


def _default_disk_path_cfg() -> str | None:
    if not dask.config.get("zcache.disk.enabled", default=True):
        return None
    path = dask.config.get("zcache.disk.path", default=None)
    return str(path) if path else default_disk_path()


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        k = k.replace("_", "-")
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _flatten(m: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in m.items():
        key = prefix + str(k).replace("_", "-")
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: process-wide settings under ``zcache.`` that are not a cache's (decoded_pipeline.py)
_PROCESS_KEYS = ("decoded-array-api",)


def _kwargs_from_mapping(m: Mapping[str, Any]) -> dict[str, Any]:
    flat = _flatten(m)
    kwargs: dict[str, Any] = {}
    for key, value in flat.items():
        if key in _FIELD_OF:
            kwargs[_FIELD_OF[key]] = value
        elif key not in ("disk.path", "disk.enabled", *_PROCESS_KEYS):
            env = _env_var_of(f"zcache.{key}", value)
            raise ValueError(
                f"{env + ' (environment variable), ' if env else ''}"
                f"zcache.{key}: unknown setting; expected one of "
                f"{', '.join(sorted([*_FIELD_OF, 'disk.path', 'disk.enabled']))}"
            )
    if not flat.get("disk.enabled", True):
        kwargs["disk_path"] = None
    else:
        kwargs["disk_path"] = flat.get("disk.path") or default_disk_path()
    return kwargs
