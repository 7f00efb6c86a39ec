"""The ``/zcache`` page on the Dask dashboard, and its JSON API.

`add_routes` mounts four routes on the scheduler's running HTTP server (the one
serving the Dask dashboard), under the dashboard's ``http_prefix``:

``{prefix}zcache``
    A page in Dask's own template (``base.html``: its navigation bar, stylesheet
    and Bokeh theme) with the figures of `xarray_zcache.plotting`, as wide as the
    window, and a plain-text summary line. BokehJS comes from the dashboard's
    Bokeh server (inlined when there is none). It refreshes itself: a small script
    fetches ``api/sources.json`` every few seconds (``?refresh=SECONDS``, ``0``
    turns it off) and updates the figures' data and the tables' notes in place;
    it reloads the page when the set of workers changed. ``{prefix}zcache/``
    redirects there (the page's links are relative, like Dask's).
``{prefix}zcache/api/stats.json``
    For scripts: the cluster stats (as ``cluster_stats`` sees them), the time
    series and the decision log. ``?series=N`` / ``?decisions=N`` keep only the
    last N points / decisions.
``{prefix}zcache/api/sources.json``
    What the page refreshes from: `xarray_zcache.plotting.source_data`, the
    tables' `xarray_zcache.plotting.notes`, the summary line and the layout key.

The scheduler plugin calls `add_routes` when it starts, so the page is there as
soon as ``xarray_zcache.distributed.install(client)`` ran: no restart and no
preload. `add_routes` also puts the page in the navigation of Dask's dashboard
(`add_nav`): the bar and the "More..." menu of every Dask page are rendered, on each
request, from lists distributed builds once per scheduler, so an entry added to them
later shows from the next page load on.

The handlers look the plugin up on every request, so they always show the plugin
currently installed (and answer 503 when none is). Nothing they return holds
credentials: cache keys are dataset namespaces (``s3://bucket/...``) plus chunk
keys, and the rest are counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tornado import web

if TYPE_CHECKING:
    from distributed import Client, Scheduler

    from xarray_zcache.distributed.clusterstats import ClusterStats
    from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin

__all__ = [
    "PAGE",
    "add_nav",
    "add_routes",
    "build_payload",
    "http_prefix",
    "nav_variables",
    "page_path",
    "remove_nav",
    "remove_routes",
    "render_page",
    "snapshot",
    "worker_labels",
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


def short_address(address: str) -> str:
    """``"tcp://10.0.0.5:40123"`` -> ``"10.0.0.5:40123"`` (the address without its protocol)."""
    return address.split("://", 1)[-1]


def worker_labels(workers: Mapping[str, Any]) -> dict[str, str]:
    """One short, unique display label per worker, by address.

    The same label names a worker everywhere: in the figures, in the tables of the
    page and of the notebook. It is the worker's name when it has one
    (``"worker 0"`` for the numeric names of LocalCluster and most deployments),
    else its address without the protocol (``"10.0.0.5:40123"``); workers whose
    names collide get their short address.

    Parameters
    ----------
    workers
        Worker address -> a dict with the worker's ``name`` (the ``workers`` of the
        aggregator's cluster stats), or -> the name itself.

    Returns
    -------
    dict
        Worker address -> label, in name order (numeric names by value).
    """
    names: dict[str, str] = {}
    for addr, w in workers.items():
        name = w.get("name") if isinstance(w, Mapping) else w
        names[addr] = "" if name is None else str(name)

    def order(addr: str) -> tuple[int, int, str, str]:
        name = names[addr]
        return (0, int(name), "", addr) if name.isdigit() else (1, 0, name, addr)

    labels: dict[str, str] = {}
    for addr in sorted(names, key=order):
        name = names[addr]
        if not name or name == addr:
            labels[addr] = short_address(addr)
        else:
            labels[addr] = f"worker {name}" if name.isdigit() else name
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    out = {a: (lab if counts[lab] == 1 else short_address(a)) for a, lab in labels.items()}
    if len(set(out.values())) < len(out):  # short addresses collide (different protocols)
        out = {a: (lab if counts[lab] == 1 else a) for a, lab in labels.items()}
    return out


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
        figures), ``cluster`` (``zcache_cluster_stats()``: `ClusterStats.to_dict`,
        which `ClusterStats.from_dict` reads back), ``series`` (oldest first) and
        ``decisions`` (oldest first).
    """
    from xarray_zcache.plotting import summary

    cluster = plugin.cluster_stats()
    points = list(plugin.series)
    log = list(plugin.decisions)
    n_dec = MAX_DECISIONS if decisions is None else decisions
    payload: dict[str, Any] = jsonable(
        {
            "time": time.time(),
            "summary": summary(cluster),
            "cluster": cluster.to_dict(),
            "series": points if series is None else _last(points, series),
            "decisions": _last(log, n_dec),
        }
    )
    return payload


def _last(items: list[Any], n: int) -> list[Any]:
    return items[max(0, len(items) - n) :] if n > 0 else []


def snapshot(client: Client) -> dict[str, Any]:
    """What the page shows, fetched from a client: cluster stats and time series.

    Parameters
    ----------
    client
        A client of a cluster with zcache installed.

    Returns
    -------
    dict
        ``cluster`` (the JSON-able dict of `~xarray_zcache.distributed.ClusterStats`,
        ``ClusterStats.to_dict``) and ``series`` (the time series, oldest first): the
        two arguments of `xarray_zcache.plotting.dashboard`.

    Raises
    ------
    RuntimeError
        If the aggregator is not installed.
    """
    from xarray_zcache.distributed import cluster_stats

    rpc: Any = client.scheduler
    cluster = cluster_stats(client)
    series = client.sync(rpc.zcache_timeseries)  # type: ignore[no-untyped-call]
    return {"cluster": jsonable(cluster.to_dict()), "series": jsonable(list(series or []))}


# -- the page ------------------------------------------------------------------------------------

#: the page's own template: Dask's ``base.html`` (its navigation bar, stylesheet and icon)
#: around the figures, a summary line and the script that refreshes them
_PAGE_TEMPLATE = """{% extends "base.html" %}
{% block js_resources %}{{ bokeh_js }}{% endblock %}
{% block extra_resources %}
<style>
  .zcache-page { padding: 0 6px; color: #222; }
  .zcache-head { display: flex; align-items: baseline; gap: 8px 24px; flex-wrap: wrap;
                 margin: 8px 0 0 0; }
  .zcache-head h1 { font-size: 18px; margin: 0; font-weight: 600; }
  .zcache-head a { font-size: 13px; color: #2b6cb0; }
  #zcache-summary { font-size: 14px; margin: 8px 0 2px 0; font-weight: 600; }
  #zcache-status { font-size: 12px; color: #666; margin-bottom: 8px; }
  #zcache-status.stale { color: #b00; }
</style>
{% endblock %}
{% block content %}
<div class="zcache-page">
<div class="zcache-head">
  <h1>xarray-zcache: the cluster's caches</h1>
  <a href="{{ json_url }}">stats.json</a>
</div>
<p id="zcache-summary">{{ summary }}</p>
<div id="zcache-status">{{ status }}</div>
{{ plot_div }}
{{ plot_script }}
</div>
<script>
(function () {
  "use strict";
  var config = {{ config }};
  document.title = "Dask: xarray-zcache";
  // Dask's navigation bar is fixed on top and wraps on narrow windows: keep clear of it
  var navbar = document.getElementById("myTopnav");
  function clearNavbar() {
    if (navbar) { document.body.style.paddingTop = (navbar.offsetHeight + 8) + "px"; }
  }
  clearNavbar();
  window.addEventListener("resize", clearNavbar);
  var here = document.querySelector("#myTopnav li a[href='" + config.page + "']");
  if (here) { here.closest("li").classList.add("active"); }
  var layoutKey = config.layout_key;
  var status = document.getElementById("zcache-status");
  var summary = document.getElementById("zcache-summary");
  window.zcacheRefreshes = 0;
  if (!(config.refresh_ms > 0)) { return; }
  function schedule() { window.setTimeout(tick, config.refresh_ms); }
  function update(doc, d) {
    Object.keys(d.sources).forEach(function (name) {
      var source = doc.get_model_by_name("zcache-source-" + name);
      if (source) { source.data = d.sources[name]; }
    });
    Object.keys(d.notes || {}).forEach(function (name) {
      var note = doc.get_model_by_name("zcache-note-" + name);
      if (note && note.text !== d.notes[name]) { note.text = d.notes[name]; }
      var table = doc.get_model_by_name("zcache-table-" + name);
      var rows = (d.sources[name] && d.sources[name].key) || [];
      if (table && table.visible !== rows.length > 0) { table.visible = rows.length > 0; }
    });
  }
  function tick() {
    fetch(config.sources_url, {cache: "no-store"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (d) {
        if (d.layout_key !== layoutKey) { window.location.reload(); return; }
        summary.textContent = d.summary;
        var docs = (window.Bokeh && window.Bokeh.documents) || [];
        if (docs.length > 0) { update(docs[0], d); }
        window.zcacheRefreshes += 1;
        status.textContent = "updated " + new Date().toLocaleTimeString()
          + " (every " + config.refresh_ms / 1000 + " s)";
        status.className = "";
        schedule();
      })
      .catch(function (e) {
        status.textContent = "no answer from the scheduler (" + e.message + "), retrying";
        status.className = "stale";
        schedule();
      });
  }
  schedule();
})();
</script>
{% endblock %}
"""

#: the entry of the page in the "More..." menu of Dask's navigation bar
NAV_PLOT = {"url": PAGE, "name": "xarray-zcache"}
#: Dask's navigation without a dashboard to take it from (`render_page` with ``nav=None``)
DEFAULT_NAV: dict[str, Any] = {
    "pages": ["status", "workers", "tasks", "system", "profile", "graph", "groups", PAGE, "info"],
    "plots": [NAV_PLOT],
    "jupyter": False,
}


def _template() -> Any:
    """The page's Jinja template, extending the ``base.html`` of Dask's dashboard."""
    global _TEMPLATE
    if _TEMPLATE is None:
        import os

        import distributed.http
        import jinja2

        dask_templates = os.path.join(os.path.dirname(distributed.http.__file__), "templates")
        env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(
                [
                    jinja2.DictLoader({"zcache.html": _PAGE_TEMPLATE}),
                    jinja2.FileSystemLoader(dask_templates),
                ]
            ),
            autoescape=False,  # every variable is escaped (or is Bokeh's markup) already
        )
        _TEMPLATE = env.get_template("zcache.html")
    return _TEMPLATE


_TEMPLATE: Any = None


def _theme() -> Any:
    """Dask's Bokeh theme (transparent plot backgrounds, no Bokeh logo), if it can be found."""
    import os

    import distributed.dashboard
    from bokeh.themes import Theme

    path = os.path.join(os.path.dirname(distributed.dashboard.__file__), "theme.yaml")
    return Theme(filename=path) if os.path.exists(path) else None


def _resources() -> str:
    """Bokeh's JavaScript and CSS, inlined (computed once per process: it is a few MB)."""
    global _RESOURCES
    if _RESOURCES is None:
        from bokeh.resources import Resources

        res = Resources(mode="inline", components=["bokeh", "bokeh-widgets", "bokeh-tables"])
        _RESOURCES = res.render()
    return _RESOURCES


_RESOURCES: str | None = None


def render_page(
    cluster: ClusterStats | Mapping[str, Any],
    series: list[dict[str, Any]],
    *,
    prefix: str = "/",
    refresh: float = DEFAULT_REFRESH,
    nav: Mapping[str, Any] | None = None,
    resources: str | None = None,
) -> str:
    """The HTML of the ``/zcache`` page: Dask's header and navigation, then the figures.

    Parameters
    ----------
    cluster
        The aggregator's cluster stats (a `ClusterStats`, or its dict).
    series
        The aggregator's time series, oldest first.
    prefix
        The dashboard's HTTP prefix (``"/"`` or ``"/some/prefix/"``).
    refresh
        Seconds between two refreshes of the figures (``0``: never).
    nav
        The template variables of Dask's dashboard (``pages``, ``plots``,
        ``jupyter``): what its navigation bar shows. `DEFAULT_NAV` by default.
    resources
        The HTML loading BokehJS (e.g. from the Bokeh server of Dask's dashboard);
        inlined by default, so the page also works without one.

    Returns
    -------
    str
        An HTML document. Its links to Dask's pages and statics are relative: it
        must be served at ``{prefix}zcache`` (no trailing slash).
    """
    import html

    from bokeh.embed import components

    from xarray_zcache import plotting
    from xarray_zcache.distributed.clusterstats import as_cluster_stats

    cluster = as_cluster_stats(cluster)
    layout = plotting.dashboard(cluster, series, with_summary=False)
    script, div = components(layout, theme=_theme())
    base = prefix + PAGE
    config = {
        "layout_key": plotting.layout_key(cluster),
        "sources_url": base + "/api/sources.json",
        "refresh_ms": round(max(0.0, refresh) * 1000),
        "page": PAGE,
    }
    when = time.strftime("%H:%M:%S")
    status = (
        f"as of {when}; updates every {refresh:g} s" if refresh > 0 else f"as of {when} (static)"
    )
    variables = {**DEFAULT_NAV, **(nav or {})}
    page: str = _template().render(
        pages=[str(p) for p in variables.get("pages") or []],
        plots=list(variables.get("plots") or []),
        jupyter=bool(variables.get("jupyter")),
        bokeh_js=_resources() if resources is None else resources,
        bokeh_css="",
        json_url=html.escape(base + "/api/stats.json"),
        summary=html.escape(plotting.summary_text(cluster)),
        status=html.escape(status),
        plot_div=div,
        plot_script=script,
        config=_dumps(config),
    )
    return page


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
            cluster = plugin.cluster_stats()
            self.write_json(
                {
                    "time": time.time(),
                    "layout_key": plotting.layout_key(cluster),
                    "summary": plotting.summary_text(cluster),
                    "sources": plotting.source_data(cluster, list(plugin.series)),
                    "notes": plotting.notes(cluster),
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
        cluster = plugin.cluster_stats()  # a model of its own: safe to read in another thread
        series = jsonable(list(plugin.series))
        nav = nav_variables(self.scheduler)
        resources = _server_resources(self.scheduler)
        # building and serializing the figures takes ~0.1 s: not on the scheduler's event loop
        page = await asyncio.to_thread(
            render_page,
            cluster,
            series,
            prefix=self.prefix,
            refresh=refresh,
            nav=None if nav is None else dict(nav),
            resources=resources,
        )
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page)


class SlashHandler(_Handler):
    """``GET {prefix}zcache/``: to ``{prefix}zcache`` (the page's links are relative to it)."""

    def get(self) -> None:
        self.redirect(self.prefix + PAGE)


_HANDLERS: tuple[type[_Handler], ...] = (
    PageHandler,
    StatsJSONHandler,
    SourcesJSONHandler,
    SlashHandler,
)


# -- Dask's navigation ---------------------------------------------------------------------------


def _bokeh_server(scheduler: Scheduler) -> Any | None:
    """The Bokeh server application of Dask's dashboard, if the scheduler runs one."""
    app = getattr(scheduler, "http_application", None)
    for sub in getattr(app, "applications", []):
        if hasattr(sub, "app_paths") and callable(getattr(sub, "resources", None)):
            return sub
    return None


def _server_resources(scheduler: Scheduler) -> str | None:
    """``<script>`` tags loading BokehJS from the dashboard's Bokeh server (``None``: none)."""
    server = _bokeh_server(scheduler)
    if server is None:
        return None
    try:
        from bokeh.resources import Resources

        res = server.resources()
        if not isinstance(res, Resources) or res.mode not in ("server", "server-dev"):
            return None
        return str(res.render_js()) + str(res.render_css())
    except Exception:  # an unexpected Bokeh: inline resources work all the same
        logger.debug("xarray-zcache: no Bokeh server resources", exc_info=True)
        return None


def nav_variables(scheduler: Scheduler) -> dict[str, Any] | None:
    """The template variables Dask's dashboard pages render their navigation bar from.

    Distributed builds them once per scheduler (``distributed.dashboard.scheduler.
    template_variables``, memoized) and hands every page of the dashboard the same
    ``pages`` and ``plots`` lists; pages render their template on every request. So
    an entry added to those lists shows in the navigation of every page from the
    next load on, whenever it is added: also after the scheduler started, which
    is when ``install(client)`` registers the plugin.

    Returns
    -------
    dict or None
        That very dict (mutable), or ``None`` when the scheduler has no dashboard.
    """
    if _bokeh_server(scheduler) is None:
        return None
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:
        return None
    variables = template_variables(scheduler)
    return variables if isinstance(variables, dict) else None


def add_nav(scheduler: Scheduler) -> bool:
    """Add the page to Dask's navigation bar (before "Info") and its "More..." menu.

    Returns
    -------
    bool
        Whether the dashboard's navigation has the page now.
    """
    variables = nav_variables(scheduler)
    if variables is None:
        return False
    pages, plots = variables.get("pages"), variables.get("plots")
    if isinstance(pages, list) and PAGE not in pages:
        pages.insert(pages.index("info") if "info" in pages else len(pages), PAGE)
    if isinstance(plots, list) and not any(
        isinstance(p, dict) and p.get("url") == PAGE for p in plots
    ):
        plots.append(dict(NAV_PLOT))
        plots.sort(key=lambda p: str(p.get("name", "")).lower() if isinstance(p, dict) else "")
    return isinstance(pages, list) and PAGE in pages


def remove_nav(scheduler: Scheduler) -> None:
    """Take the page out of Dask's navigation again (no-op if it is not in)."""
    variables = nav_variables(scheduler)
    if variables is None:
        return
    pages, plots = variables.get("pages"), variables.get("plots")
    if isinstance(pages, list):
        pages[:] = [p for p in pages if p != PAGE]
    if isinstance(plots, list):
        plots[:] = [p for p in plots if not (isinstance(p, dict) and p.get("url") == PAGE)]


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
                (base, PageHandler, kwargs),
                (base + "/", SlashHandler, kwargs),
                (base + "/api/stats.json", StatsJSONHandler, kwargs),
                (base + "/api/sources.json", SourcesJSONHandler, kwargs),
            ],
        )
    except Exception:  # never let the dashboard break the plugin
        logger.exception("xarray-zcache: could not add the /zcache page to the dashboard")
        return None
    try:
        add_nav(scheduler)
    except Exception:  # the page works without its entry in the navigation
        logger.exception("xarray-zcache: could not add the page to the dashboard's navigation")
    return base


def remove_routes(scheduler: Scheduler) -> None:
    """Unmount what `add_routes` mounted (no-op if nothing is)."""
    app = getattr(scheduler, "http_application", None)
    router = getattr(app, "default_router", None)
    if router is None:
        return
    router.rules[:] = [r for r in router.rules if not _is_ours(r)]
    try:
        remove_nav(scheduler)
    except Exception:
        logger.exception("xarray-zcache: could not take the page out of the navigation")


def page_path(dask_scheduler: Scheduler) -> str | None:
    """The path the page is mounted at on this scheduler, or ``None`` if it is not.

    Meant for ``client.run_on_scheduler(page_path)``.
    """
    app = getattr(dask_scheduler, "http_application", None)
    if app is None or not any(_is_ours(r) for r in _rules(app)):
        return None
    prefix = http_prefix(dask_scheduler)
    return None if prefix is None else prefix + PAGE
