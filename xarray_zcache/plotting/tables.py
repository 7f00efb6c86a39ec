"""The tables of the ``/zcache`` page: the cluster's hot keys and the aggregator's decisions.

Each function takes a `~bokeh.models.ColumnDataSource` of
`xarray_zcache.plotting.make_sources` and returns one `~bokeh.models.DataTable`.
"""

from __future__ import annotations

from bokeh.models import ColumnDataSource
from bokeh.models.widgets.tables import DataTable, NumberFormatter, TableColumn

from xarray_zcache.plotting.figures import MIN_WIDTH, SIZING

__all__ = ["TABLE_NAMES", "decisions_table", "hot_keys_table"]


#: the tables, and the note above each (``zcache-table-<name>``, ``zcache-note-<name>``)
TABLE_NAMES = ("hot_keys", "decisions")


def _table(
    source: ColumnDataSource, name: str, height: int, columns: list[TableColumn]
) -> DataTable:
    """Table ``zcache-table-<name>`` of ``source``, hidden while it has no ``key``."""
    return DataTable(
        source=source,
        columns=columns,
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        autosize_mode="fit_columns",
        height=height,
        index_position=None,
        visible=bool(source.data["key"]),
        name=f"zcache-table-{name}",
    )


def hot_keys_table(hot_keys: ColumnDataSource) -> DataTable:
    """The cluster's hottest keys: reads, cluster read rate now and at peak, who holds them where.

    Parameters
    ----------
    hot_keys
        The ``hot_keys`` source of `make_sources`.

    Returns
    -------
    bokeh.models.DataTable
        Hidden while there are no hot keys (`notes` says so instead).
    """
    rate = NumberFormatter(format="0.00")
    return _table(
        hot_keys,
        "hot_keys",
        260,
        [
            TableColumn(field="count", title="reads", width=60),
            TableColumn(field="rate", title="rate now (/s)", width=90, formatter=rate),
            TableColumn(field="peak", title="peak (/s)", width=80, formatter=rate),
            TableColumn(field="key", title="key", width=560),
            TableColumn(field="workers", title="held by (tier)", width=260),
        ],
    )


def decisions_table(decisions: ColumnDataSource) -> DataTable:
    """The aggregator's latest promotion and warm decisions, newest first.

    Parameters
    ----------
    decisions
        The ``decisions`` source of `make_sources`.

    Returns
    -------
    bokeh.models.DataTable
        Hidden while the aggregator made no decision (`notes` says so instead).
    """
    return _table(
        decisions,
        "decisions",
        220,
        [
            TableColumn(field="time", title="time", width=70),
            TableColumn(field="action", title="action", width=70),
            TableColumn(field="worker", title="worker", width=150),
            TableColumn(
                field="rate",
                title="cluster rate (/s)",
                width=110,
                formatter=NumberFormatter(format="0.00"),
            ),
            TableColumn(field="key", title="key", width=600),
        ],
    )
