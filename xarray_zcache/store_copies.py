"""How a `CachedStore` travels: it pickles as its wrapped store and config (never the
cache contents) with what names its data, the units this process confirmed and its open;
unpickled in another process or on a Dask worker, it binds at its first call to the cache
of that process or worker. `__dask_tokenize__`: copies of one store are one token.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING, Any

from xarray_zcache.identity import Identity, fresh_private
from xarray_zcache.store_validation import SourceValidation

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = ["StoreCopies"]


class StoreCopies(SourceValidation):
    """Part of `CachedStore` (its state is the store's)."""

    _store: Store
    _identity: Identity
    _named: bool

    if TYPE_CHECKING:  # (defined by `CachedStore`)

        def _adopt(self, identity: Identity, *, named: bool) -> None: ...
        def _init_local(self) -> None: ...

    def __dask_tokenize__(self) -> tuple[object, ...]:
        return (type(self).__qualname__, self._namespace, self._store.read_only, self._config)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "store": self._store,
            "config": self._config,
            "identity": self._identity,
            "named": self._named,
            "object_units": self._object_units,
            "confirmed": self._confirmations(),
            "opened": self._opened,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = state["store"]
        self._config = state["config"]
        identity: Identity = state["identity"]
        if identity.private and not state["named"]:
            # private to the store object: this copy holds its own data (a MemoryStore's
            # copy, a session's copy), never what the original cached
            identity = dataclasses.replace(identity, namespace=fresh_private("copy"))
        self._adopt(identity, named=state["named"])
        self._object_units = state["object_units"]
        self._opened = state.get("opened") or secrets.token_hex(8)
        self._init_local()
        self._confirmed_by = state.get("confirmed", {})
