"""The ``/zcache`` page on the Dask dashboard, and its JSON API.

`add_routes` mounts three routes on the scheduler's running HTTP server (the one
serving the Dask dashboard), under the dashboard's ``http_prefix``:

``{prefix}zcache``
    A standalone HTML page (Bokeh, resources inlined: it works offline) with the
    figures of `xarray_zcache.plotting` and a plain-text summary line. It
    refreshes itself: a small script fetches ``api/sources.json`` every few
    seconds (``?refresh=SECONDS``, ``0`` turns it off) and updates the figures'
    data in place; it reloads the page when the set of workers changed.
``{prefix}zcache/api/stats.json``
    For scripts: the cluster stats (as ``cluster_stats`` sees them), the time
    series and the decision log. ``?series=N`` / ``?decisions=N`` keep only the
    last N points / decisions.
``{prefix}zcache/api/sources.json``
    What the page refreshes from: `xarray_zcache.plotting.source_data`, the
    summary line and the layout key.

The scheduler plugin calls `add_routes` when it starts, so the page is there as
soon as ``xarray_zcache.distributed.install(client)`` ran: no restart and no
preload. The handlers look the plugin up on every request, so they always show
the plugin currently installed (and answer 503 when none is). Nothing they
return holds credentials: cache keys are dataset namespaces (``s3://bucket/...``)
plus chunk keys, and the rest are counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from tornado import web

if TYPE_CHECKING:
    from distributed import Client, Scheduler

    from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin

__all__ = [
    "PAGE",
    "add_routes",
    "build_payload",
    "http_prefix",
    "page_path",
    "remove_routes",
    "render_page",
    "snapshot",
]

logger = logging.getLogger("xarray_zcache.distributed")

PLUGIN_NAME = "zcache-scheduler"
#: path of the page below the dashboard's prefix
PAGE = "zcache"
#: seconds between two refreshes of the page's figures
DEFAULT_REFRESH = 2.0
#: decisions shown on the page and returned by default
MAX_DECISIONS = 50


# -- data ----------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists, string keys, and non-finite floats as ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(obj: Any) -> str:
    # "</" can't close a <script> element the JSON is embedded in
    return json.dumps(jsonable(obj), allow_nan=False).replace("</", "<\\/")


def build_payload(
    plugin: ZCacheSchedulerPlugin,
    *,
    series: int | None = None,
    decisions: int | None = None,
) -> dict[str, Any]:
    """The document of ``api/stats.json``, from the aggregator's current state.

    Parameters
    ----------
    plugin
        The scheduler's aggregator.
    series
        Keep only the last ``series`` points of the time series (all by default).
    decisions
        Keep only the last ``decisions`` decisions (`MAX_DECISIONS` by default).

    Returns
    -------
    dict
        ``time`` (epoch seconds), ``summary`` (`xarray_zcache.plotting.summary`
        figures), ``cluster`` (``zcache_cluster_stats()``), ``series`` (oldest
        first) and ``decisions`` (oldest first).
    """
    cluster = plugin.zcache_cluster_stats()
    points = list(plugin.series)
    log = list(plugin.decisions)
    n_dec = MAX_DECISIONS if decisions is None else decisions
    payload: dict[str, Any] = jsonable(
        {
            "time": time.time(),
            "summary": _summary(cluster),
            "cluster": cluster,
            "series": points if series is None else _last(points, series),
            "decisions": _last(log, n_dec),
        }
    )
    return payload


def _last(items: list[Any], n: int) -> list[Any]:
    return items[max(0, len(items) - n) :] if n > 0 else []


def _summary(cluster: dict[str, Any]) -> dict[str, Any]:
    from xarray_zcache.plotting import summary

    return summary(cluster)


def snapshot(client: Client) -> dict[str, Any]:
    """What the page shows, fetched from a client: cluster stats and time series.

    Parameters
    ----------
    client
        A client of a cluster with zcache installed.

    Returns
    -------
    dict
        ``cluster`` (the dict of ``zcache_cluster_stats``) and ``series`` (the
        time series, oldest first): the two arguments of
        `xarray_zcache.plotting.dashboard`.

    Raises
    ------
    RuntimeError
        If the aggregator is not installed.
    """
    rpc: Any = client.scheduler
    cluster = client.sync(rpc.zcache_cluster_stats)  # type: ignore[no-untyped-call]
    series = client.sync(rpc.zcache_timeseries)  # type: ignore[no-untyped-call]
    if cluster is None:
        raise RuntimeError(
            "the scheduler has no zcache aggregator: call xarray_zcache.distributed.install(client)"
        )
    return {"cluster": jsonable(cluster), "series": jsonable(list(series or []))}


# -- the page ------------------------------------------------------------------------------------

_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>xarray-zcache | Dask</title>
<link rel="icon" href="data:,">
<style>
  body {{ font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
         margin: 16px 24px; color: #222; }}
  header {{ display: flex; align-items: baseline; gap: 24px; flex-wrap: wrap; }}
  h1 {{ font-size: 20px; margin: 0; }}
  #zcache-summary {{ font-size: 15px; margin: 8px 0 4px 0; font-weight: 600; }}
  #zcache-status {{ font-size: 12px; color: #666; margin-bottom: 12px; }}
  #zcache-status.stale {{ color: #b00; }}
  a {{ color: #2b6cb0; }}
</style>
{resources}
</head>
<body>
<header>
  <h1>xarray-zcache: the cluster's caches</h1>
  <a href="{status_url}">Dask dashboard</a>
  <a href="{json_url}">stats.json</a>
</header>
<p id="zcache-summary">{summary}</p>
<div id="zcache-status">{status}</div>
{div}
{script}
<script>
(function () {{
  "use strict";
  var config = {config};
  var layoutKey = config.layout_key;
  var status = document.getElementById("zcache-status");
  var summary = document.getElementById("zcache-summary");
  window.zcacheRefreshes = 0;
  if (!(config.refresh_ms > 0)) {{ return; }}
  function schedule() {{ window.setTimeout(tick, config.refresh_ms); }}
  function tick() {{
    fetch(config.sources_url, {{cache: "no-store"}})
      .then(function (r) {{
        if (!r.ok) {{ throw new Error("HTTP " + r.status); }}
        return r.json();
      }})
      .then(function (d) {{
        if (d.layout_key !== layoutKey) {{ window.location.reload(); return; }}
        summary.textContent = d.summary;
        var docs = (window.Bokeh && window.Bokeh.documents) || [];
        if (docs.length > 0) {{
          Object.keys(d.sources).forEach(function (name) {{
            var source = docs[0].get_model_by_name("zcache-source-" + name);
            if (source) {{ source.data = d.sources[name]; }}
          }});
        }}
        window.zcacheRefreshes += 1;
        status.textContent = "updated " + new Date().toLocaleTimeString()
          + " (every " + config.refresh_ms / 1000 + " s)";
        status.className = "";
        schedule();
      }})
      .catch(function (e) {{
        status.textContent = "no answer from the scheduler (" + e.message + "), retrying";
        status.className = "stale";
        schedule();
      }});
  }}
  schedule();
}})();
</script>
</body>
</html>
"""


def _resources() -> str:
    """Bokeh's JavaScript, inlined (computed once per process: it is a few MB)."""
    global _RESOURCES
    if _RESOURCES is None:
        from bokeh.resources import Resources

        res = Resources(mode="inline", components=["bokeh", "bokeh-widgets", "bokeh-tables"])
        _RESOURCES = res.render()
    return _RESOURCES


_RESOURCES: str | None = None


def render_page(
    cluster: dict[str, Any],
    series: list[dict[str, Any]],
    *,
    prefix: str = "/",
    refresh: float = DEFAULT_REFRESH,
) -> str:
    """The HTML of the ``/zcache`` page.

    Parameters
    ----------
    cluster
        The aggregator's cluster stats dict.
    series
        The aggregator's time series, oldest first.
    prefix
        The dashboard's HTTP prefix (``"/"`` or ``"/some/prefix/"``).
    refresh
        Seconds between two refreshes of the figures (``0``: never).

    Returns
    -------
    str
        A standalone HTML document.
    """
    import html

    from bokeh.embed import components

    from xarray_zcache import plotting

    layout = plotting.dashboard(cluster, series, with_summary=False)
    script, div = components(layout)
    base = prefix + PAGE
    config = {
        "layout_key": plotting.layout_key(cluster),
        "sources_url": base + "/api/sources.json",
        "refresh_ms": round(max(0.0, refresh) * 1000),
    }
    when = time.strftime("%H:%M:%S")
    status = (
        f"as of {when}; updates every {refresh:g} s" if refresh > 0 else f"as of {when} (static)"
    )
    return _PAGE_TEMPLATE.format(
        resources=_resources(),
        status_url=html.escape(prefix + "status"),
        json_url=html.escape(base + "/api/stats.json"),
        summary=html.escape(plotting.summary_text(cluster)),
        status=html.escape(status),
        div=div,
        script=script,
        config=_dumps(config),
    )


# -- handlers ------------------------------------------------------------------------------------


class _Handler(web.RequestHandler):
    """Base: finds the aggregator on every request; never cached by the browser."""

    def initialize(self, dask_server: Scheduler, prefix: str) -> None:
        self.scheduler = dask_server
        self.prefix = prefix

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def plugin(self) -> ZCacheSchedulerPlugin | None:
        from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin

        plugin = self.scheduler.plugins.get(PLUGIN_NAME)
        if not isinstance(plugin, ZCacheSchedulerPlugin) or not hasattr(plugin, "series"):
            self.set_status(503)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(
                _dumps(
                    {
                        "error": "xarray-zcache is not installed on this cluster: "
                        "call xarray_zcache.distributed.install(client)"
                    }
                )
            )
            return None
        return plugin

    def int_argument(self, name: str) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise web.HTTPError(400, f"{name} must be an integer") from None
        if value < 0:
            raise web.HTTPError(400, f"{name} must be >= 0")
        return value

    def write_json(self, obj: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(_dumps(obj))


class StatsJSONHandler(_Handler):
    """``GET {prefix}zcache/api/stats.json``: `build_payload`."""

    def get(self) -> None:
        plugin = self.plugin()
        if plugin is not None:
            self.write_json(
                build_payload(
                    plugin,
                    series=self.int_argument("series"),
                    decisions=self.int_argument("decisions"),
                )
            )


class SourcesJSONHandler(_Handler):
    """``GET {prefix}zcache/api/sources.json``: what the page refreshes its figures from."""

    def get(self) -> None:
        from xarray_zcache import plotting

        plugin = self.plugin()
        if plugin is not None:
            cluster = plugin.zcache_cluster_stats()
            self.write_json(
                {
                    "time": time.time(),
                    "layout_key": plotting.layout_key(cluster),
                    "summary": plotting.summary_text(cluster),
                    "sources": plotting.source_data(cluster, list(plugin.series)),
                }
            )


class PageHandler(_Handler):
    """``GET {prefix}zcache``: the HTML page (`render_page`)."""

    async def get(self) -> None:
        raw = self.get_query_argument("refresh", None)
        try:
            refresh = DEFAULT_REFRESH if raw is None else float(raw)
        except ValueError:
            raise web.HTTPError(400, "refresh must be a number of seconds") from None
        if not math.isfinite(refresh) or refresh < 0:
            raise web.HTTPError(400, "refresh must be a number of seconds >= 0")
        refresh = max(refresh, 0.5) if refresh > 0 else 0.0
        try:
            import bokeh  # noqa: F401
        except ImportError:
            self.set_status(501)
            self.set_header("Content-Type", "text/plain; charset=UTF-8")
            self.finish(
                "The /zcache page needs Bokeh on the scheduler: pip install 'xarray-zcache"
                "[dashboard]'. The JSON is at zcache/api/stats.json.\n"
            )
            return
        plugin = self.plugin()
        if plugin is None:
            return
        cluster = jsonable(plugin.zcache_cluster_stats())
        series = jsonable(list(plugin.series))
        # building and serializing the figures takes ~0.1 s: not on the scheduler's event loop
        page = await asyncio.to_thread(
            render_page, cluster, series, prefix=self.prefix, refresh=refresh
        )
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page)


_HANDLERS: tuple[type[_Handler], ...] = (PageHandler, StatsJSONHandler, SourcesJSONHandler)


# -- mounting ------------------------------------------------------------------------------------


def _normalize(prefix: str | None) -> str:
    """``"/"`` or ``"/a/b/"``."""
    stripped = (prefix or "").strip("/")
    return f"/{stripped}/" if stripped else "/"


def http_prefix(scheduler: Scheduler) -> str | None:
    """The prefix the scheduler's HTTP routes are mounted under (``"/"`` by default).

    Read from the Bokeh dashboard application when there is one, else from where
    distributed mounted its ``health`` route.

    Returns
    -------
    str or None
        ``"/"`` or ``"/prefix/"``; ``None`` when the scheduler has no HTTP server.
    """
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return None
    for sub in getattr(app, "applications", []):
        prefix = getattr(sub, "prefix", None)
        if isinstance(prefix, str):
            return _normalize(prefix)
    for rule in _rules(app):
        for inner in getattr(rule.target, "rules", []):
            pattern = getattr(getattr(inner.matcher, "regex", None), "pattern", "")
            if pattern.endswith("health$"):
                return _normalize(pattern[: -len("health$")])
    return "/"


def _rules(app: Any) -> list[Any]:
    router = getattr(app, "default_router", None)
    return list(getattr(router, "rules", []))


def _is_ours(rule: Any) -> bool:
    return any(
        getattr(inner, "target", None) in _HANDLERS for inner in getattr(rule.target, "rules", [])
    )


def add_routes(scheduler: Scheduler) -> str | None:
    """Mount the page and the JSON routes on the scheduler's HTTP server (idempotent).

    Parameters
    ----------
    scheduler
        The running scheduler (called from the plugin's ``start``).

    Returns
    -------
    str or None
        The page's path (e.g. ``"/zcache"``), or ``None`` if the scheduler serves
        no HTTP (then nothing is mounted; the plugin works all the same).
    """
    prefix = http_prefix(scheduler)
    app = getattr(scheduler, "http_application", None)
    if prefix is None or app is None:
        logger.info("xarray-zcache: the scheduler has no HTTP server; no /zcache page")
        return None
    try:
        remove_routes(scheduler)
        kwargs = {"dask_server": scheduler, "prefix": prefix}
        base = prefix + PAGE
        app.add_handlers(
            r".*$",
            [
                (base + "/?", PageHandler, kwargs),
                (base + "/api/stats.json", StatsJSONHandler, kwargs),
                (base + "/api/sources.json", SourcesJSONHandler, kwargs),
            ],
        )
    except Exception:  # never let the dashboard break the plugin
        logger.exception("xarray-zcache: could not add the /zcache page to the dashboard")
        return None
    return base


def remove_routes(scheduler: Scheduler) -> None:
    """Unmount what `add_routes` mounted (no-op if nothing is)."""
    app = getattr(scheduler, "http_application", None)
    router = getattr(app, "default_router", None)
    if router is None:
        return
    router.rules[:] = [r for r in router.rules if not _is_ours(r)]


def page_path(dask_scheduler: Scheduler) -> str | None:
    """The path the page is mounted at on this scheduler, or ``None`` if it is not.

    Meant for ``client.run_on_scheduler(page_path)``.
    """
    app = getattr(dask_scheduler, "http_application", None)
    if app is None or not any(_is_ours(r) for r in _rules(app)):
        return None
    prefix = http_prefix(dask_scheduler)
    return None if prefix is None else prefix + PAGE
