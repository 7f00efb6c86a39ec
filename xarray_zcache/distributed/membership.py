"""Cache hosts and key owners: rendezvous (HRW) hashing over the cluster's members.

A *cache host* is one disk folder: the workers of one machine that share a folder
are one cache host (they already see each other's disk entries); a worker with a
folder of its own, or memory only, is one cache host by itself. Every cache key
has one owning cache host: the member with the highest ``hash(member, key)``.
When a member joins or leaves, only the keys it owns or gains move (HRW's
minimal remap). Membership is versioned; a worker with stale membership is at
worst one hop or one source read away from right, never wrong (answers are
checked end to end).

No Dask or zarr here: the scheduler and the workers both use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Membership", "host_id"]


def host_id(host: str, disk_path: str | None, worker: str, per_worker: bool) -> str:
    """The cache host a worker belongs to.

    Workers on one machine sharing one disk folder are one host; otherwise the
    worker is a host by itself.
    """
    if disk_path is None or per_worker:
        return f"worker:{worker}"
    return f"folder:{host}:{disk_path}"


def _weight(member: str, key: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclasses.dataclass(frozen=True)
class Membership:
    """The cache hosts of a cluster at one version, with the workers of each.

    Parameters
    ----------
    version
        Increases with every change (the scheduler's counter).
    hosts
        Cache host id -> worker addresses serving it (sorted).
    """

    version: int = 0
    hosts: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def owner(self, key: str) -> str | None:
        """The cache host owning ``key`` (``None`` without members)."""
        best, best_w = None, -1
        for member in self.hosts:
            w = _weight(member, key)
            if w > best_w:
                best, best_w = member, w
        return best

    def workers_of(self, host: str) -> tuple[str, ...]:
        return tuple(self.hosts.get(host, ()))

    def host_of(self, worker: str) -> str | None:
        for host, workers in self.hosts.items():
            if worker in workers:
                return host
        return None

    def with_worker(self, host: str, worker: str) -> Membership:
        hosts = {h: tuple(w for w in ws if w != worker) for h, ws in self.hosts.items()}
        hosts[host] = tuple(sorted({*hosts.get(host, ()), worker}))
        return Membership(self.version + 1, {h: ws for h, ws in hosts.items() if ws})

    def without_worker(self, worker: str) -> Membership:
        if self.host_of(worker) is None:
            return self
        hosts = {h: tuple(w for w in ws if w != worker) for h, ws in self.hosts.items()}
        return Membership(self.version + 1, {h: ws for h, ws in hosts.items() if ws})

    def to_msg(self) -> dict[str, Any]:
        """msgpack-able form."""
        return {"version": self.version, "hosts": {h: list(ws) for h, ws in self.hosts.items()}}

    @classmethod
    def from_msg(cls, msg: Mapping[str, Any]) -> Membership:
        hosts = msg.get("hosts") or {}
        return cls(
            int(msg.get("version", 0)),
            {str(h): tuple(str(w) for w in ws) for h, ws in dict(hosts).items()},
        )

    def moved(self, other: Membership, keys: Iterable[str]) -> list[str]:
        """The keys whose owner differs between ``self`` and ``other``."""
        return [k for k in keys if self.owner(k) != other.owner(k)]
