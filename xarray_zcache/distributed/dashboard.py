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
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from tornado import web

from xarray_zcache.distributed.common import PLUGIN_NAME, Aggregator
from xarray_zcache.distributed.dashboard_json import (
    MAX_DECISIONS,
    _dumps,
    build_payload,
    jsonable,
    short_address,
    snapshot,
    worker_labels,
)
from xarray_zcache.distributed.dashboard_page import (
    DEFAULT_NAV,
    DEFAULT_REFRESH,
    NAV_PLOT,
    PAGE,
    render_page,
)

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = [
    "DEFAULT_NAV",
    "DEFAULT_REFRESH",
    "MAX_DECISIONS",
    "NAV_PLOT",
    "PAGE",
    "add_nav",
    "add_routes",
    "build_payload",
    "http_prefix",
    "jsonable",
    "nav_variables",
    "page_path",
    "remove_nav",
    "remove_routes",
    "render_page",
    "short_address",
    "snapshot",
    "worker_labels",
]

logger = logging.getLogger("xarray_zcache.distributed")


# -- handlers ------------------------------------------------------------------------------------


class _Handler(web.RequestHandler):
    """Base: finds the aggregator on every request; never cached by the browser."""

    def initialize(self, dask_server: Scheduler, prefix: str) -> None:
        self.scheduler = dask_server
        self.prefix = prefix

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def plugin(self) -> Aggregator | None:
        plugin = self.scheduler.plugins.get(PLUGIN_NAME)
        if not isinstance(plugin, Aggregator):  # not installed, or not started
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
