"""One stats model: `CacheStats` fields -> the worker's wire vector -> the scheduler's totals
-> `ClusterStats` -> the plots, with no hand-kept field lists on the way."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from distributed import Client, LocalCluster

from xarray_zcache import plotting
from xarray_zcache.cache.stats import LATENCY_BUCKETS_MS, TIERS, CacheStats
from xarray_zcache.distributed import ClusterStats, ZCacheSchedulerPlugin
from xarray_zcache.distributed.dashboard import jsonable

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _numbers(value: Any) -> int:
    """How many integers a field's value holds (nested dicts and lists)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, dict):
        return sum(_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_numbers(v) for v in value)
    return 0


def _random_stats(seed: int) -> CacheStats:
    rng = random.Random(seed)
    return CacheStats.from_vector([rng.randrange(1, 10_000) for _ in CacheStats.WIRE_PATHS])


def test_the_wire_form_is_every_integer_of_the_fields() -> None:
    default = CacheStats()
    assert len(CacheStats.WIRE_PATHS) == _numbers(dataclasses.asdict(default))
    assert len(set(CacheStats.WIRE_PATHS)) == len(CacheStats.WIRE_PATHS)
    names = CacheStats.VECTOR_FIELDS
    # the peer tier, read-ahead hits and the peer figures are on the wire with no edit of their own
    for tier in TIERS:
        assert f"hits.{tier}.chunk" in names and f"evictions.{tier}" in names
    for name in ("prefetch_hits", "peer_served", "peer_served_bytes", "peer_loads"):
        assert name in names
    assert "peer_fallbacks" in names and "memory_entry_overhead" in names
    for hist in ("peer_latency_ms", "fetch_latency_ms"):
        assert [n for n in names if n.startswith(hist + ".")] == [
            f"{hist}.{i}" for i in range(len(LATENCY_BUCKETS_MS))
        ]
    # what is not an integer is not on the wire
    assert not {"disk_path", "hot_keys", "uptime"} & {p[0] for p in CacheStats.WIRE_PATHS}
    assert CacheStats.wire_index("disk_used") == names.index("disk_used")
    with pytest.raises(KeyError, match="not a field of the stats vector"):
        CacheStats.wire_index("disk_usage")


def test_vector_and_dict_round_trips() -> None:
    s = _random_stats(1)
    vec = s.to_vector()
    for path, x in zip(CacheStats.WIRE_PATHS, vec, strict=True):  # each number at its path
        value: Any = getattr(s, str(path[0]))
        for k in path[1:]:
            value = value[k]
        assert value == x
    assert CacheStats.from_vector(vec) == s
    assert CacheStats.from_vector(tuple(vec)) == s  # msgpack gives tuples

    s.disk_path, s.hot_keys, s.uptime = "/cache", [("s3://b/x.zarr/t/c/0", 3)], 12.5
    assert CacheStats.from_dict(s.to_dict()) == s
    assert CacheStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_from_dict_reads_older_dicts_and_rejects_bad_ones() -> None:
    d = _random_stats(2).to_dict()
    for counts in (d["hits"], d["hit_bytes"], d["evictions"]):
        del counts["peer"]  # a dict from before the peer tier
    del d["peer_latency_ms"], d["prefetch_hits"]
    old = CacheStats.from_dict(d)
    assert old.total_hits(tier="peer") == 0 and old.evictions["peer"] == 0
    assert old.prefetch_hits == 0 and old.peer_latency_ms == [0] * len(LATENCY_BUCKETS_MS)
    assert old.hits["memory"] == d["hits"]["memory"]
    assert CacheStats.from_dict({"promotions": 3}).promotions == 3

    with pytest.raises(ValueError, match="fetch_latency_ms: wrong number of buckets"):
        CacheStats.from_dict({"fetch_latency_ms": [1, 2]})
    with pytest.raises(ValueError, match=r"misses\.chunk must be a number"):
        CacheStats.from_dict({"misses": {"chunk": "many"}})
    with pytest.raises(ValueError, match=r"expected \d+ numbers"):
        CacheStats.from_vector([1, 2, 3])


def test_arithmetic_follows_the_field_metadata() -> None:
    a, b = _random_stats(3), _random_stats(4)
    a.disk_path = b.disk_path = "/cache"
    a.uptime, b.uptime = 5.0, 9.0
    total = a + b
    assert total.total_hits() == a.total_hits() + b.total_hits()  # counters: summed
    assert total.peer_latency_ms == [
        x + y for x, y in zip(a.peer_latency_ms, b.peer_latency_ms, strict=True)
    ]
    assert total.memory_used == a.memory_used + b.memory_used  # summable gauge
    assert total.memory_entry_overhead == max(a.memory_entry_overhead, b.memory_entry_overhead)
    assert (total.uptime, total.disk_path) == (9.0, "/cache")
    delta = total - a
    assert delta.hits == b.hits and delta.peer_served == b.peer_served  # counters: subtracted
    assert delta.memory_used == total.memory_used  # gauges: the later snapshot's


def test_cluster_stats_round_trip_and_errors() -> None:
    a, b = _random_stats(5), _random_stats(6)
    a.disk_path = b.disk_path = "/cache"
    cs = ClusterStats(
        workers={"tcp://h:1": a, "tcp://h:2": b},
        names={"tcp://h:1": "0", "tcp://h:2": "1"},
        hosts={"tcp://h:1": "h", "tcp://h:2": "h"},
        total=a + b,
        hot_keys=[{"key": "k", "count": 2, "rate": 0.5, "peak_rate": 1.0, "workers": {}}],
        decisions=[
            {"time": 1.0, "action": "promote", "worker": "tcp://h:1", "key": "k", "rate": 1}
        ],
        promotion_threshold=2.0,
    )
    back = ClusterStats.from_dict(json.loads(json.dumps(jsonable(cs.to_dict()))))
    assert back.workers == cs.workers and back.total == cs.total
    assert (back.names, back.hosts) == (cs.names, cs.hosts)
    assert back.hot_keys == cs.hot_keys and back.promotion_threshold == 2.0
    # one shared folder on host "h": counted once
    assert back.disk_usage() == (
        max(a.disk_used, b.disk_used),
        max(a.disk_capacity, b.disk_capacity),
        1,
    )
    # the plots take the model or its dict, to the same result
    assert plotting.source_data(cs, []) == plotting.source_data(cs.to_dict(), [])
    assert plotting.summary_text(cs) == plotting.summary_text(back)
    assert plotting.source_data(cs, [])["tiers"]["peer"][-1] == cs.total.total_hits(tier="peer")

    with pytest.raises(ValueError, match="'workers' must be a dict"):
        ClusterStats.from_dict({"workers": [1, 2]})
    with pytest.raises(ValueError, match="rate must be a number"):
        ClusterStats.from_dict({"hot_keys": [{"key": "k", "rate": "fast"}]})


# -- the scheduler's aggregator, on a real (threaded) cluster ------------------------------------


@pytest.fixture
def client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as c,
        Client(c) as cl,
    ):
        cl.register_plugin(ZCacheSchedulerPlugin())  # the aggregator only: we send the reports
        yield cl


def test_the_scheduler_totals_by_field_name(client: Client) -> None:
    workers = sorted(client.scheduler_info()["workers"])  # type: ignore[no-untyped-call]
    stats = {w: _random_stats(10 + i) for i, w in enumerate(workers)}
    for w, s in stats.items():
        reply = client.sync(
            client.scheduler.zcache_report,  # type: ignore[union-attr]
            report={
                "worker": w,
                "name": w,
                "host": "one-host",
                "disk_path": "/shared",  # the two workers share one disk folder
                "stats": s.to_vector(),
                "hot": [],
                "time": 1.0,
            },
        )
        assert "error" not in reply
    raw = client.sync(client.scheduler.zcache_cluster_stats)  # type: ignore[union-attr]
    cs = ClusterStats.from_dict(raw)
    a, b = (stats[w] for w in workers)
    assert cs.workers[workers[0]].to_vector() == a.to_vector()
    t = cs.total
    assert t.total_hits(tier="peer") == a.total_hits(tier="peer") + b.total_hits(tier="peer")
    assert t.peer_latency_ms == [
        x + y for x, y in zip(a.peer_latency_ms, b.peer_latency_ms, strict=True)
    ]
    assert t.prefetch_hits == a.prefetch_hits + b.prefetch_hits
    assert t.memory_used == a.memory_used + b.memory_used
    assert t.memory_entry_overhead == max(a.memory_entry_overhead, b.memory_entry_overhead)
    # the disk folder is the last reporter's figures, counted once
    assert (t.disk_used, t.disk_capacity, t.disk_entries) == (
        b.disk_used,
        b.disk_capacity,
        b.disk_entries,
    )
    assert cs.workers[workers[0]].disk_path == "/shared"

    bad = client.sync(
        client.scheduler.zcache_report,  # type: ignore[union-attr]
        report={"worker": workers[0], "stats": [1, 2, 3]},
    )
    assert "malformed report" in bad["error"]
