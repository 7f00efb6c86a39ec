"""zarr's own property-based state machines, run against `CachedStore`.

`ZarrStoreStateMachine` drives raw store operations (set, get, ranged reads, delete,
clear, exists, listings) and compares with a dict; `ZarrHierarchyStateMachine` builds
groups and arrays, writes, resizes and deletes them, and compares with a `MemoryStore`.
Both run here against a `CachedStore` over a `MemoryStore` and over a `LocalStore`:
memory only, and with a tiny memory tier over a disk tier for each eviction policy
(so nearly every read goes through eviction, demotion and the disk tier).

Every write goes through the `CachedStore`, so the default TTLs apply: a cache that is
coherent with its own writes must pass with any TTL.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from hypothesis.strategies import DataObject
from zarr.abc.store import Store
from zarr.storage import LocalStore, MemoryStore
from zarr.testing.stateful import ZarrHierarchyStateMachine, ZarrStoreStateMachine

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.registry import close_all

pytestmark = pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")

POLICIES = ("lru", "slru", "tinylfu")

_STORE_SETTINGS = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_HIERARCHY_SETTINGS = settings(
    max_examples=8,
    stateful_step_count=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _configs(tmp: pathlib.Path) -> dict[str, CacheConfig]:
    """Memory only, then a tiny memory tier (a few bytes / a few KB) over disk, per policy."""
    base = CacheConfig().with_name("stateful")
    out = {"memory-only": base.with_memory_size("8MB").without_disk_cache()}
    for policy in POLICIES:
        tiny = base.with_eviction_policy(policy).with_disk_cache(tmp / f"cache-{policy}", "1GB")
        out[f"{policy}-1B-over-disk"] = tiny.with_memory_size(1)
        out[f"{policy}-4KB-over-disk"] = tiny.with_memory_size("4KB")
    return out


CONFIG_IDS = ["memory-only"] + [f"{p}-{m}-over-disk" for p in POLICIES for m in ("1B", "4KB")]


# the variants outside the fast set run few examples: together they cover every policy and
# tier size, and the whole file stays around a minute in `make test`
_FEW = 3


def _how(base: settings, config_id: str, fast: set[str]) -> settings:
    return base if config_id in fast else settings(base, max_examples=_FEW)


_STORE_FAST = {"memory-only", "tinylfu-1B-over-disk"}
_HIERARCHY_FAST = {"memory-only", "lru-1B-over-disk"}


def _params(fast: set[str]) -> list[Any]:
    """Every config; the ones outside ``fast`` marked slow (the file stays well under 60 s)."""
    return [pytest.param(c, id=c, marks=() if c in fast else pytest.mark.slow) for c in CONFIG_IDS]


@pytest.fixture
def cache_root(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    root = tmp_path / "caches"
    root.mkdir()
    yield root
    close_all()


def _inner(kind: str, tmp: pathlib.Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    data = tmp / "data"  # the same folder every example: cleared by the machine, via the cache
    data.mkdir(exist_ok=True)
    return LocalStore(data)


def _run(
    machine: Callable[[], RuleBasedStateMachine],
    how: settings,
) -> None:
    run_state_machine_as_test(machine, settings=how)


class _StoreMachineOverCache(ZarrStoreStateMachine):
    """zarr's store machine; one `CachedStore` per example, the disk tier shared between them."""

    def teardown(self) -> None:
        self.store.store.close()
        close_all()  # the next example starts like a new process: from the disk tier only


class _HierarchyMachineOverCache(ZarrHierarchyStateMachine):
    """zarr's hierarchy machine.

    zarr skips its ``list_dir`` check for a bare `LocalStore` (which lists empty
    folders the model does not hold); the same holds for a `CachedStore` over one,
    so the check is skipped there too (with ``assume``, as zarr does).
    """

    def teardown(self) -> None:
        close_all()  # the next example starts like a new process: from the disk tier only

    @precondition(lambda self: bool(self.all_groups))
    @rule(data=st.data())
    def check_list_dir(self, data: DataObject) -> None:
        assume(not isinstance(self.store.inner, LocalStore))
        ZarrHierarchyStateMachine.check_list_dir(self, data)


@pytest.mark.parametrize("inner_kind", ["memory", "local"])
@pytest.mark.parametrize("config_id", _params(_STORE_FAST))
def test_zarr_store_state_machine(
    inner_kind: str, config_id: str, cache_root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    cfg = _configs(cache_root)[config_id]

    def make() -> RuleBasedStateMachine:
        return _StoreMachineOverCache(CachedStore(_inner(inner_kind, tmp_path), cfg))

    _run(make, _how(_STORE_SETTINGS, config_id, _STORE_FAST))


@pytest.mark.parametrize("inner_kind", ["memory", "local"])
@pytest.mark.parametrize("config_id", _params(_HIERARCHY_FAST))
def test_zarr_hierarchy_state_machine(
    inner_kind: str, config_id: str, cache_root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    cfg = _configs(cache_root)[config_id]

    def make() -> RuleBasedStateMachine:
        return _HierarchyMachineOverCache(CachedStore(_inner(inner_kind, tmp_path), cfg))

    _run(make, _how(_HIERARCHY_SETTINGS, config_id, _HIERARCHY_FAST))
