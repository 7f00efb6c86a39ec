"""The HTML of the ``/zcache`` page: Dask's ``base.html`` around the figures (`render_page`).

See `xarray_zcache.distributed.dashboard` for its routes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.dashboard_json import _dumps

if TYPE_CHECKING:
    from xarray_zcache.distributed.clusterstats import ClusterStats

__all__ = ["DEFAULT_NAV", "DEFAULT_REFRESH", "NAV_PLOT", "PAGE", "render_page"]

#: path of the page below the dashboard's prefix
PAGE = "zcache"
#: seconds between two refreshes of the page's figures
DEFAULT_REFRESH = 2.0

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
