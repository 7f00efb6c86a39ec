"""The ``/zcache`` page on the Dask dashboard: its JSON over plain HTTP, the page in a browser.

The browser test drives Debian's ``chromium`` through ``chromedriver`` (selenium),
headless: it reaches the page from Dask's own navigation bar, checks that nothing is
cut off at 1,400 and 900 px, and saves screenshots to
``test-artifacts/zcache-dashboard-1400.png`` and ``-900.png``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig, plotting
from xarray_zcache.distributed import dashboard
from xarray_zcache.testing.writers import write_zarr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


# -- helpers -------------------------------------------------------------------------------------


def _wait(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s")
        time.sleep(0.1)


def _get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def _get_json(url: str) -> Any:
    status, ctype, body = _get(url)
    assert status == 200, body
    assert ctype.startswith("application/json")
    return json.loads(body)


def _write(url: str, opts: dict[str, Any]) -> None:
    rng = np.random.default_rng(2)
    ds = xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), rng.normal(280, 5, (16, 32, 32)).astype("f4")),
            "tp": (("time", "lat", "lon"), rng.gamma(0.5, 1e-3, (16, 32, 32)).astype("f4")),
        },
        coords={"time": np.arange(16)},
    )
    chunks = {"chunks": (2, 16, 16)}
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t2m": chunks, "tp": chunks})


def _worker_own_totals(dask_worker: Any) -> tuple[int, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    s = state.cache.stats()
    return s.total_hits(), s.total_misses()


def _drop_memory_tier(dask_worker: Any) -> None:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    state.cache.flush()
    state.cache.memory_tier.clear()


def _settled(client: Client) -> bool:
    """The aggregator saw the workers' final figures, and the time series has them too."""
    own = client.run(_worker_own_totals)
    stats = zd.cluster_stats(client)
    if len(stats.workers) != len(own):
        return False
    for w, (hits, misses) in own.items():
        s = stats.workers.get(w)
        if s is None or s.total_hits() != hits or s.total_misses() != misses:
            return False
    series = client.sync(client.scheduler.zcache_timeseries, n=1)  # type: ignore[union-attr]
    # (a point is taken at most once a second: the last may predate another worker's report)
    total = stats.total
    return (
        bool(series)
        and series[-1]["misses"] == total.total_misses()
        and series[-1]["hits_memory"] + series[-1]["hits_disk"] == total.total_hits()
    )


def _cluster(**scheduler_kwargs: Any) -> LocalCluster:
    # tcp on loopback: the dashboard link then points at 127.0.0.1
    return LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs=scheduler_kwargs or None,
    )


@pytest.fixture
def config(tmp_path: Path) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(tmp_path / "cache", "256MB")
    # worker-local promotion off: disk hits stay on disk until the aggregator promotes them
    cfg = cfg.with_name("dashboard-test").with_promotion_threshold(1e9)
    return cfg._replace(report_interval=0.2)


class Work:
    """A cluster with zcache installed that read a dataset twice (second time from disk)."""

    def __init__(self, client: Client, url: str, opts: dict[str, Any], config: CacheConfig) -> None:
        self.client, self.url, self.opts, self.config = client, url, opts, config

    def open(self) -> xr.Dataset:
        return xr.open_dataset(
            self.url,
            engine="zcache",
            chunks={},
            storage_options=self.opts,
            cache_config=self.config,
        )

    def link(self) -> str:
        return zd.dashboard_link(self.client)


@pytest.fixture
def work(s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig) -> Iterator[Work]:
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    with _cluster() as cluster, Client(cluster) as client:
        zd.install(client, config, promotion_threshold=0.5)
        w = Work(client, url, s3_options, config)
        ds = w.open()
        ds.t2m.mean("time").compute()  # cold: every chunk from S3, into memory and disk
        client.run(_drop_memory_tier)
        ds.t2m.mean("time").compute()  # from disk: hot disk-only keys get promoted
        ds.close()
        _wait(lambda: _settled(client), what="the aggregator's figures settling")
        yield w


# -- plotting (no cluster) -------------------------------------------------------------------


def _fake_stats() -> dict[str, Any]:
    from xarray_zcache.cache.stats import CacheStats

    a, b = CacheStats(), CacheStats()
    a.hits["memory"]["chunk"], a.hits["disk"]["chunk"], a.misses["chunk"] = 6, 2, 2
    b.hits["memory"]["chunk"], b.misses["chunk"], b.negative_hits = 1, 3, 1
    for s, used in ((a, 100), (b, 300)):
        s.memory_used, s.memory_capacity = used, 1000
        s.disk_used, s.disk_capacity, s.disk_path = 5000, 10_000, "/cache"
    a.decoded_hits, a.decoded_misses, a.decoded_evictions = 5, 3, 1
    a.decoded_used, a.decoded_capacity = 200, 400
    b.decoded_misses, b.decoded_capacity = 2, 400
    a.evictions["memory"], a.evictions["disk"], b.evictions["memory"] = 4, 1, 2
    total = a + b
    return {
        "workers": {
            "tcp://127.0.0.1:1": {"name": "0", "host": "127.0.0.1", **a.to_dict()},
            "tcp://127.0.0.1:2": {"name": "1", "host": "127.0.0.1", **b.to_dict()},
        },
        "total": total.to_dict(),
        "promotion_threshold": 2.0,
        "hot_keys": [
            {
                "key": "s3://b/x.zarr/t/c/0",
                "count": 5,
                "rate": 1.5,
                "peak_rate": 4.0,
                "workers": {"tcp://127.0.0.1:1": "disk"},
            }
        ],
        "decisions": [
            {
                "time": 1.7e9,
                "action": "promote",
                "worker": "tcp://127.0.0.1:1",
                "key": "k",
                "rate": 2.0,
            }
        ],
    }


def test_plotting_from_plain_data() -> None:
    from bokeh.embed import json_item

    stats = _fake_stats()
    series = [
        {"time": 100.0, "hit_rate": 0.0, "hits_memory": 0, "hits_disk": 0, "misses": 4},
        {"time": 101.0, "hit_rate": 0.5, "hits_memory": 3, "hits_disk": 1, "misses": 4},
        {"time": 102.0, "hit_rate": 0.5, "hits_memory": 3, "hits_disk": 1, "misses": 4},  # idle
        {"time": 103.0, "hit_rate": 0.0, "hits_memory": 0, "hits_disk": 0, "misses": 0},  # clear
    ]
    data = plotting.source_data(stats, series)
    assert set(data) == set(plotting.SOURCE_NAMES)
    for name, cols in data.items():  # every source is a proper table
        assert len({len(v) for v in cols.values()}) == 1, name
    json.dumps(data, allow_nan=False)
    assert data["series"]["time"] == [100_000.0, 101_000.0, 102_000.0, 103_000.0]
    assert data["recent"]["hit_rate"] == [1.0]  # only intervals that saw reads
    assert data["workers"]["label"] == ["worker 0", "worker 1"]
    assert data["tiers"]["label"] == ["worker 0", "worker 1", "cluster"]
    assert data["tiers"]["memory"] == [6, 2, 8]  # the known-missing hit counts as memory
    assert data["tiers"]["miss"] == [2, 3, 5]
    # the decoded tier beside the byte tiers: its reads, hit rate, use and evictions
    assert data["tiers"]["decoded_hits"] == [5, 0, 5]
    assert data["tiers"]["decoded_misses"] == [3, 2, 5]
    assert data["tiers"]["decoded_hit_rate"] == [5 / 8, 0.0, 0.5]
    assert data["tiers"]["decoded_text"] == ["hit rate 62.5%", "hit rate 0.0%", "hit rate 50.0%"]
    assert data["tiers"]["evictions_memory"] == [4, 2, 6]
    assert data["tiers"]["evictions_decoded"] == [1, 0, 1]
    assert data["tiers"]["evictions_disk"] == [1, 0, 1]
    assert data["workers"]["decoded_used"] == [200, 0]
    assert data["workers"]["decoded_capacity"] == [400, 400]
    assert data["workers"]["decoded_pct"] == [0.5, 0.0]
    assert data["workers"]["decoded_text"] == ["200 B of 400 B (50.0%)", "0 B of 400 B (0.0%)"]
    assert data["hot_keys"]["workers"] == ["worker 0: disk"]
    assert data["hot_keys"]["rate"] == [1.5] and data["hot_keys"]["peak"] == [4.0]
    assert data["decisions"]["worker"] == ["worker 0"]
    note = plotting.notes(stats)
    assert "1 hottest key" in note["hot_keys"] and "read 2/s or more" in note["hot_keys"]
    assert note["decisions"].startswith("The aggregator&#x27;s latest 1 decision")

    s = plotting.summary(stats)
    assert s["hit_rate"] == pytest.approx(10 / 15)
    assert (s["disk_used"], s["disk_folders"]) == (5000, 1)  # one shared folder, counted once
    for w in stats["workers"].values():  # reports that don't say which folder: plain sums
        w["disk_path"] = None
    assert (plotting.summary(stats)["disk_used"], plotting.summary(stats)["disk_folders"]) == (
        10_000,
        None,
    )
    assert plotting.summary_text(stats).startswith("cluster hit rate: 66.7% | 2 workers")
    assert "| decoded 200 B of 800 B (hit rate 50.0%) |" in plotting.summary_text(stats)
    assert (s["decoded_hits"], s["decoded_misses"], s["decoded_hit_rate"]) == (5, 5, 0.5)
    assert (s["evictions_memory"], s["evictions_decoded"], s["evictions_disk"]) == (6, 1, 1)

    layout = plotting.dashboard(stats, series)
    json_item(layout)  # serializes
    named = [m.name for m in layout.references() if m.name]
    assert len(named) == len(set(named))  # BokehJS's get_model_by_name needs unique names
    names = set(named)
    assert {f"zcache-source-{n}" for n in plotting.SOURCE_NAMES} <= names
    assert set(plotting.figures(stats, series)) == {
        "hit_rate",
        "saved",
        "memory",
        "decoded",
        "disk",
        "tiers",
        "decoded_reads",
        "evictions",
        "hot_keys",
        "decisions",
    }
    assert {"zcache-decoded", "zcache-decoded-reads", "zcache-evictions"} <= names


def test_plotting_with_no_data() -> None:
    from bokeh.embed import json_item

    empty: dict[str, Any] = {"workers": {}, "total": {}, "hot_keys": [], "decisions": []}
    json_item(plotting.dashboard(empty, []))
    assert plotting.summary_text(empty).startswith("cluster hit rate: 0.0% | 0 workers")
    assert plotting.source_data(empty, [])["workers"]["label"] == [plotting.NO_WORKERS_LABEL]
    note = plotting.notes(empty)
    assert note["hot_keys"].startswith("None yet")
    assert note["decisions"].startswith("None yet: the aggregator promotes")
    # promotions counted by the workers, but no decision of the aggregator: said so
    counted = {**empty, "total": {"promotions": 3}}
    assert "counted 3 promotions" in plotting.notes(counted)["decisions"]
    # the empty tables are hidden, the notes say why
    tables = {
        m.name: m
        for m in plotting.dashboard(empty, []).references()
        if m.name in {"zcache-table-hot_keys", "zcache-table-decisions"}
    }
    assert len(tables) == 2 and not any(t.visible for t in tables.values())
    with pytest.raises(ValueError, match="tier"):
        plotting.capacity_figure(plotting.make_sources(empty, [])["workers"], "tape")


def test_worker_labels_one_name_each() -> None:
    labels = dashboard.worker_labels(
        {
            "tcp://10.0.0.5:1": {"name": "1"},
            "tcp://10.0.0.5:2": {"name": "0"},
            "tcp://10.0.0.6:3": {"name": "tcp://10.0.0.6:3"},  # named by its address
            "tcp://10.0.0.7:4": {"name": "gpu"},
            "tcp://10.0.0.7:5": {"name": "gpu"},  # names collide
            "tls://10.0.0.8:6": {},
        }
    )
    assert labels == {
        "tcp://10.0.0.5:2": "worker 0",
        "tcp://10.0.0.5:1": "worker 1",
        "tcp://10.0.0.7:4": "10.0.0.7:4",
        "tcp://10.0.0.7:5": "10.0.0.7:5",
        "tcp://10.0.0.6:3": "10.0.0.6:3",
        "tls://10.0.0.8:6": "10.0.0.8:6",
    }
    assert list(labels)[:2] == ["tcp://10.0.0.5:2", "tcp://10.0.0.5:1"]


def test_panels_show_one_by_one() -> None:
    from bokeh.embed import json_item

    stats = _fake_stats()
    names = list(plotting.figures(stats, []))
    for name in names:  # each in a document of its own, as notebook cells show them
        json_item(plotting.panel(name, stats, []))
    with pytest.raises(ValueError, match="unknown panel"):
        plotting.panel("pie", stats, [])


def _runtime_imports(path: Path) -> set[str]:
    """The package modules a module imports at run time (at import or in a function)."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for the type checker only are no circle
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("xarray_zcache")}


def test_no_import_circle_between_the_page_the_stats_and_the_scheduler() -> None:
    import xarray_zcache

    root = Path(xarray_zcache.__file__).parent
    modules = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in [*root.glob("distributed/*.py"), *root.glob("plotting/*.py")]
    }
    graph = {m: _runtime_imports(p) & set(modules) - {m} for m, p in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, set())
        return False

    circles = sorted(m for m in modules if reaches(m, m))
    assert circles == [], circles


def test_no_http_server_no_crash() -> None:
    class Bare:
        plugins: dict[str, Any] = {}

    bare: Any = Bare()
    assert dashboard.http_prefix(bare) is None
    assert dashboard.add_routes(bare) is None
    dashboard.remove_routes(bare)
    assert dashboard.page_path(bare) is None


# -- the JSON over plain HTTP --------------------------------------------------------------------


def test_stats_json_matches_cluster_stats(work: Work, s3_options: dict[str, Any]) -> None:
    link = work.link()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/zcache", link)
    assert work.client.dashboard_link.removesuffix("/status") + "/zcache" == link

    doc = _get_json(link + "/api/stats.json")
    stats = zd.cluster_stats(work.client)
    assert set(doc) >= {"time", "summary", "cluster", "series", "decisions"}
    # the same figures as cluster_stats, per worker and in total
    seen = zd.ClusterStats.from_dict(doc["cluster"])
    # (compared as JSON: msgpack gives tuples where JSON gives lists)
    assert seen.names == stats.names and set(seen.workers) == set(stats.workers)
    for w, s in stats.workers.items():
        assert dashboard.jsonable(seen.workers[w].to_dict()) == dashboard.jsonable(s.to_dict())
    assert dashboard.jsonable(seen.total.to_dict()) == dashboard.jsonable(stats.total.to_dict())
    assert [(h["key"], h["count"]) for h in seen.hot_keys] == [
        (h["key"], h["count"]) for h in stats.hot_keys
    ]
    assert [d["key"] for d in seen.decisions] == [d["key"] for d in stats.decisions]
    total = stats.total
    assert total.total_misses("chunk") == 32 and total.total_hits("chunk", tier="disk") == 32
    assert doc["summary"]["hit_rate"] == pytest.approx(total.hit_rate())
    assert doc["summary"]["misses"] == total.total_misses()
    assert doc["summary"]["bytes_saved"] == total.bytes_saved
    assert doc["summary"]["requests_saved"] == total.requests_saved
    assert doc["summary"]["workers"] == 2
    assert doc["series"] and doc["series"][-1]["hit_rate"] == pytest.approx(total.hit_rate())
    assert doc["decisions"] == doc["cluster"]["decisions"][-len(doc["decisions"]) :]
    assert any(d["action"] == "promote" for d in doc["decisions"])
    # the keys' read rates: "now" is 0 once reading stopped, the peak is what promoted them
    hot = doc["cluster"]["hot_keys"]
    assert hot and all(h["peak_rate"] >= h["rate"] >= 0 for h in hot)
    promoted = {d["key"] for d in doc["decisions"] if d["action"] == "promote"}
    assert all(h["peak_rate"] >= 0.5 for h in hot if h["key"] in promoted)
    assert max(h["peak_rate"] for h in hot) > 0

    # limits
    short = _get_json(link + "/api/stats.json?series=1&decisions=0")
    assert len(short["series"]) == 1 and short["decisions"] == []
    assert _get(link + "/api/stats.json?series=-1")[0] == 400
    assert _get(link + "/api/stats.json?series=x")[0] == 400

    # no credentials, ever: keys are dataset namespaces
    status, _, body = _get(link + "/api/stats.json")
    for secret in {str(s3_options["key"]), str(s3_options["secret"])}:
        assert f'"{secret}"' not in body
    assert "endpoint_url" not in body

    # what the page refreshes from
    src = _get_json(link + "/api/sources.json")
    assert src["summary"] == plotting.summary_text(doc["cluster"])
    assert src["summary"].startswith(f"cluster hit rate: {total.hit_rate():.1%} | 2 workers")
    assert set(src["sources"]) == set(plotting.SOURCE_NAMES)
    assert src["notes"] == plotting.notes(doc["cluster"])
    assert max(src["sources"]["hot_keys"]["peak"]) > 0

    # the page itself, as plain HTML
    status, ctype, page = _get(link)
    assert status == 200 and ctype.startswith("text/html")
    assert f"cluster hit rate: {total.hit_rate():.1%}" in page
    assert "Bokeh" in page and "zcache-source-series" in page
    # in Dask's template: its navigation bar (with the page in it) and stylesheet
    assert 'id="myTopnav"' in page and 'href="statics/css/base.css"' in page
    assert 'href="zcache"' in page and 'href="status"' in page
    # and in the navigation of Dask's own pages, though the plugin came after the scheduler
    status, _, dask_page = _get(work.client.dashboard_link)
    assert status == 200 and 'href="zcache"' in dask_page
    assert ">xarray-zcache</a>" in dask_page  # the "More..." menu too
    assert _get(link + "/")[0] == 200  # redirected to the page (its links are relative)
    assert _get(link + "?refresh=nope")[0] == 400


def _worker_decoded(dask_worker: Any) -> dict[str, int]:
    """A worker's decoded-tier figures, as its own cache counts them."""
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    s = state.cache.stats()
    return {
        "decoded_hits": s.decoded_hits,
        "decoded_misses": s.decoded_misses,
        "decoded_evictions": s.decoded_evictions,
        "decoded_used": s.decoded_used,
        "decoded_capacity": s.decoded_capacity,
        "memory_evictions": s.evictions["memory"],
    }


def _as_seen(s: Any) -> dict[str, int]:
    return {
        "decoded_hits": s.decoded_hits,
        "decoded_misses": s.decoded_misses,
        "decoded_evictions": s.decoded_evictions,
        "decoded_used": s.decoded_used,
        "decoded_capacity": s.decoded_capacity,
        "memory_evictions": s.evictions["memory"],
    }


def _page_sources(page: str) -> dict[str, dict[str, list[Any]]]:
    """The data of the ``zcache-source-*`` sources in the page's embedded Bokeh document."""
    import html

    found = re.search(r"const docs_json = '(.*?)';\n", page)
    assert found, "no Bokeh document in the page"
    # Bokeh embeds the JSON HTML-escaped, backslashes doubled, in a JS string
    docs = json.loads(html.unescape(found.group(1).replace("\\\\", "\\")))
    out: dict[str, dict[str, list[Any]]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            attrs = node.get("attributes") or {}
            name = str(attrs.get("name", "")) if isinstance(attrs, dict) else ""
            if node.get("name") == "ColumnDataSource" and name.startswith("zcache-source-"):
                out[name.removeprefix("zcache-source-")] = dict(attrs["data"]["entries"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return out


def test_page_shows_the_decoded_tier(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """Real decoded reads through xarray on a cluster: the page's Bokeh sources, its
    sources.json and its summary carry each worker's own decoded-tier figures, exactly."""
    url = f"s3://{s3_bucket}/decoded.zarr"
    _write(url, s3_options)
    # ~4.5 KiB per decoded chunk (2 KiB array, its encoded bytes, overhead): 48 KiB hold ~10
    # per worker, so reading t2m's 32 chunks evicts; a 4-chunk selection read twice hits
    cfg = (
        CacheConfig()
        .with_name("dashboard-decoded")
        .with_memory_size("64MB")
        .with_decoded_memory_size("48KiB")
        .with_prefetch(0)
        ._replace(report_interval=0.2)
    )
    with _cluster() as cluster, Client(cluster) as client:
        zd.install(client, cfg)
        ds = xr.open_dataset(
            url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
        )
        expected = ds.t2m.mean("time").values
        np.testing.assert_allclose(ds.t2m.mean("time").compute().values, expected)
        part = ds.t2m.isel(time=slice(0, 2))
        first = part.sum().compute().item()
        assert part.sum().compute().item() == first  # decoded hits: the same values
        ds.close()

        def settled() -> bool:
            own = client.run(_worker_decoded)
            seen = zd.cluster_stats(client).workers
            return set(own) == set(seen) and all(_as_seen(seen[w]) == o for w, o in own.items())

        _wait(settled, what="the aggregator's decoded figures settling")
        own = client.run(_worker_decoded)
        total = {k: sum(o[k] for o in own.values()) for k in next(iter(own.values()))}
        assert total["decoded_hits"] >= 4 and total["decoded_evictions"] > 0
        assert total["decoded_misses"] >= 32 and total["decoded_capacity"] == 2 * 48 * 1024
        assert all(0 < o["decoded_used"] <= o["decoded_capacity"] for o in own.values())

        link = zd.dashboard_link(client)
        labels = zd.cluster_stats(client).labels()
        status, _, page = _get(link + "?refresh=0")
        assert status == 200
        served = {"page": _page_sources(page), "json": _get_json(link + "/api/sources.json")}
        served["json"] = served["json"]["sources"]
        for where, sources in served.items():
            tiers, workers = sources["tiers"], sources["workers"]
            assert tiers["label"] == [*labels.values(), "cluster"], where
            assert workers["label"] == list(labels.values()), where
            rows = [own[w] for w in labels] + [total]
            assert tiers["decoded_hits"] == [r["decoded_hits"] for r in rows], where
            assert tiers["decoded_misses"] == [r["decoded_misses"] for r in rows], where
            assert tiers["decoded_reads"] == [
                r["decoded_hits"] + r["decoded_misses"] for r in rows
            ], where
            assert tiers["decoded_hit_rate"] == pytest.approx(
                [r["decoded_hits"] / (r["decoded_hits"] + r["decoded_misses"]) for r in rows]
            ), where
            assert tiers["evictions_decoded"] == [r["decoded_evictions"] for r in rows], where
            assert tiers["evictions_memory"] == [r["memory_evictions"] for r in rows], where
            assert workers["decoded_used"] == [own[w]["decoded_used"] for w in labels], where
            assert workers["decoded_capacity"] == [own[w]["decoded_capacity"] for w in labels], (
                where
            )
        # the figures that draw them, and the headline line
        for name in ("zcache-decoded", "zcache-decoded-reads", "zcache-evictions"):
            assert f'"name":"{name}"' in page
        rate = total["decoded_hits"] / (total["decoded_hits"] + total["decoded_misses"])
        assert f"(hit rate {rate:.1%})" in page


def test_routes_follow_the_plugin(work: Work) -> None:
    link = work.link()
    work.client.unregister_scheduler_plugin("zcache-scheduler")
    status, _, body = _get(link + "/api/stats.json")
    assert status == 503 and "install" in json.loads(body)["error"]
    assert _get(link)[0] == 503
    zd.install(work.client, work.config)  # a new aggregator: the page shows it
    assert _get_json(link + "/api/stats.json")["cluster"]["workers"] is not None


def test_http_prefix_is_respected(config: CacheConfig) -> None:
    with _cluster(http_prefix="/dask/") as cluster, Client(cluster) as client:
        zd.install(client, config)
        port = re.search(r":(\d+)/", client.dashboard_link)
        assert port
        origin = f"http://127.0.0.1:{port.group(1)}"
        # Dask's own link leaves the prefix out unless configured; ours has it
        link = zd.dashboard_link(client)
        assert link == origin + "/dask/zcache"
        assert _get_json(link + "/api/stats.json")["summary"]["workers"] <= 2
        assert _get(origin + "/zcache")[0] == 404
        status, _, page = _get(link)
        assert status == 200 and 'href="zcache"' in page  # relative: /dask/zcache
        assert 'src="/dask/static/js/bokeh' in page  # BokehJS from Dask's Bokeh server
        status, _, dask_page = _get(origin + "/dask/status")
        assert status == 200 and 'href="zcache"' in dask_page
        assert "/dask/zcache/api/sources.json" in page
        # a link configured with the prefix is not doubled
        with dask.config.set(
            {"distributed.dashboard.link": "{scheme}://{host}:{port}/dask/status"}
        ):
            assert zd.dashboard_link(client) == link


def test_dashboard_link_without_plugin_fails_clearly() -> None:
    with (
        _cluster() as cluster,
        Client(cluster) as client,
        pytest.raises(RuntimeError, match="install"),
    ):
        zd.dashboard_link(client)


# -- the page in a real browser --------------------------------------------------------------


def _chrome(tmp_path: Path) -> Any:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
            "apt-get install -y chromium chromium-driver"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1180,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


# count rendered canvases, looking inside the shadow roots Bokeh renders into
_CANVASES_JS = """
let n = 0;
const walk = (root) => {
  for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'CANVAS' && el.width > 0 && el.height > 0) n += 1;
    if (el.shadowRoot) walk(el.shadowRoot);
  }
};
walk(document);
return n;
"""

_BOKEH_JS = """
const docs = (window.Bokeh && window.Bokeh.documents) || [];
if (docs.length === 0) return null;
const doc = docs[0];
const series = doc.get_model_by_name('zcache-source-series');
const tiers = doc.get_model_by_name('zcache-source-tiers');
const hits = series ? Array.from(series.data.hit_rate) : [];
return {
  roots: doc.roots().length,
  rootDivs: document.querySelectorAll('[data-root-id]').length,
  lastHitRate: hits.length ? hits[hits.length - 1] : null,
  tierLabels: tiers ? Array.from(tiers.data.label) : [],
  refreshes: window.zcacheRefreshes,
};
"""


def _summary_hit_rate(driver: Any) -> float:
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.ID, "zcache-summary").text
    m = re.search(r"cluster hit rate: ([\d.]+)%", text)
    assert m, text
    return float(m.group(1))


# the tick labels a byte axis would draw, asked of the page's own BokehJS models
_BYTE_TICKS_JS = """
const doc = window.Bokeh.documents[0];
const axis = doc.get_model_by_name('zcache-memory').below[0];
const out = [];
for (const hi of arguments[0]) {
  const major = axis.ticker.get_ticks(0, hi, null, NaN).major;
  out.push(axis.formatter.doFormat(major, {loc: 0}));
}
return out;
"""

# what sticks out of the viewport, looking inside the shadow roots Bokeh renders into
_OVERFLOW_JS = """
const width = window.innerWidth;
let worst = 0;
const walk = (root) => {
  for (const el of root.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) worst = Math.max(worst, r.right);
    if (el.shadowRoot) walk(el.shadowRoot);
  }
};
walk(document);
const head = document.querySelector('.zcache-head').getBoundingClientRect();
return {
  headTop: head.top,
  navBottom: document.getElementById('myTopnav').getBoundingClientRect().bottom,
  innerWidth: width,
  scrollWidth: Math.max(document.body.scrollWidth, document.documentElement.scrollWidth),
  rightmost: worst,
  scrollHeight: document.documentElement.scrollHeight,
};
"""

_TABLES_JS = """
const doc = window.Bokeh.documents[0];
const out = {};
for (const name of ['hot_keys', 'decisions']) {
  out[name] = {
    visible: doc.get_model_by_name('zcache-table-' + name).visible,
    note: doc.get_model_by_name('zcache-note-' + name).text,
  };
}
const hot = doc.get_model_by_name('zcache-source-hot_keys');
out.peak = Math.max(...Array.from(hot.data.peak));
return out;
"""


def _viewport(driver: Any, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def _rendered(driver: Any) -> None:
    _wait(lambda: driver.execute_script(_BOKEH_JS) is not None, what="Bokeh document")
    _wait(lambda: driver.execute_script(_CANVASES_JS) >= 5, what="Bokeh canvases")


def test_page_renders_live_figures_in_a_browser(work: Work, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = _chrome(tmp_path)
    try:
        stats = zd.cluster_stats(work.client)
        link = work.link()
        driver.set_page_load_timeout(60)
        _viewport(driver, 1400, 1000)

        # reached from Dask's own navigation bar (the plugin was installed after the scheduler
        # started): the status page links to it, and the link leads to it
        driver.get(work.client.dashboard_link)
        nav = driver.find_elements(By.CSS_SELECTOR, "#myTopnav a[href='zcache']")
        assert nav and nav[0].text.strip() == "Zcache"
        nav[0].click()
        _wait(lambda: driver.current_url == link, what="the link in Dask's navigation")
        assert "xarray-zcache" in driver.title

        # the figures rendered: a Bokeh root, and one canvas per plot (5 plots)
        _rendered(driver)
        info = driver.execute_script(_BOKEH_JS)
        assert info["roots"] >= 1 and info["rootDivs"] >= 1
        assert info["tierLabels"] == ["worker 0", "worker 1", "cluster"]
        # in Dask's template: its navigation bar, with this page in it
        assert driver.find_elements(By.CSS_SELECTOR, "#myTopnav a[href='zcache']")
        assert driver.find_elements(By.CSS_SELECTOR, "#myTopnav a[href='status']")
        # the numbers shown are the live ones
        assert _summary_hit_rate(driver) == pytest.approx(round(stats.total.hit_rate() * 100, 1))
        assert info["lastHitRate"] == pytest.approx(stats.total.hit_rate())
        logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not logs, logs

        # byte axes tick at round binary values
        mib = 1 << 20
        assert driver.execute_script(_BYTE_TICKS_JS, [6.5 * mib, 300 * mib]) == [
            ["0", "1 MiB", "2 MiB", "3 MiB", "4 MiB", "5 MiB", "6 MiB"],
            ["0", "64 MiB", "128 MiB", "192 MiB", "256 MiB"],
        ]
        # the tables: shown, with what they mean; read rates from the aggregator's data
        tables = driver.execute_script(_TABLES_JS)
        assert tables["hot_keys"]["visible"] and tables["decisions"]["visible"]
        assert "hottest keys" in tables["hot_keys"]["note"]
        assert "latest" in tables["decisions"]["note"]
        assert tables["peak"] > 0

        # it refreshes itself, in place: more work shows up without a reload
        driver.execute_script("window.zcacheMarker = 42;")
        ds = work.open()
        ds.tp.mean("time").compute()  # new variable: 32 more misses
        ds.tp.mean("time").compute()  # and 32 hits
        ds.t2m.mean("time").compute()  # 32 more hits
        ds.close()
        _wait(lambda: _settled(work.client), what="figures settling after more work")
        after = zd.cluster_stats(work.client).total.hit_rate()
        assert round(after * 100, 1) != round(stats.total.hit_rate() * 100, 1)
        # (the time series gets at most a point a second: it may lag the summary a little)
        _wait(
            lambda: (
                _summary_hit_rate(driver) == pytest.approx(round(after * 100, 1))
                and driver.execute_script(_BOKEH_JS)["lastHitRate"] == pytest.approx(after)
            ),
            what="the page showing the new hit rate",
        )
        info = driver.execute_script(_BOKEH_JS)
        assert info["refreshes"] >= 1
        assert driver.execute_script("return window.zcacheMarker;") == 42  # not reloaded

        # nothing cut off, wide or narrow; a screenshot of the whole page at each width
        ARTIFACTS.mkdir(exist_ok=True)
        for width in (1400, 900):
            _viewport(driver, width, 1000)
            driver.get(link)
            _rendered(driver)
            time.sleep(1.0)  # let the layout settle and the last repaint land
            seen = driver.execute_script(_OVERFLOW_JS)
            assert seen["innerWidth"] == width
            assert seen["scrollWidth"] <= seen["innerWidth"], seen
            assert seen["rightmost"] <= seen["innerWidth"] + 0.5, seen
            assert seen["headTop"] >= seen["navBottom"], seen  # not under Dask's navigation
            _viewport(driver, width, max(1000, int(seen["scrollHeight"])))
            time.sleep(0.5)
            shot = ARTIFACTS / f"zcache-dashboard-{width}.png"
            assert driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 20_000
    finally:
        driver.quit()
