"""Which listings validate a unit's cached objects (`xarray_zcache.listing_plan`)."""

from __future__ import annotations

import json

from xarray_zcache.listing_plan import Grid, Slice, grid_of, plan


def _v3(shape: list[int], chunks: list[int], **encoding: object) -> bytes:
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": shape,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": encoding or {"name": "default", "configuration": {"separator": "/"}},
    }
    return json.dumps(doc).encode()


def test_grid_from_the_array_document_or_the_consolidated_root() -> None:
    docs = {"a/zarr.json": _v3([100, 40, 30], [1, 10, 10])}
    assert grid_of("a", docs.get) == Grid((100, 4, 3), "c/")
    root = {
        "zarr_format": 3,
        "node_type": "group",
        "consolidated_metadata": {"metadata": {"g/b": json.loads(_v3([8, 8], [4, 4]))}},
    }
    assert grid_of("g/b", {"zarr.json": json.dumps(root).encode()}.get) == Grid((2, 2), "c/")
    v2 = {"zarr_format": 2, "shape": [10, 10], "chunks": [5, 5], "dimension_separator": "/"}
    assert grid_of("c", {"c/.zarray": json.dumps(v2).encode()}.get) == Grid((2, 2), "")


def test_no_rows_for_one_dimension_or_unknown_metadata() -> None:
    assert grid_of("a", {"a/zarr.json": _v3([1000], [1])}.get) is None
    assert grid_of("a", {"a/zarr.json": b"{not json"}.get) is None
    assert grid_of("a", {}.get) is None


def test_rows_when_they_cost_less_than_the_whole_folder() -> None:
    grid = Grid((1000, 50, 4), "c/")  # 200,000 chunks: 201 pages
    cached = ["zarr.json", "c/7/0/0", "c/7/3/1", "c/9/49/3"]
    got = plan(cached, grid, 1000)
    assert got is not None
    assert got.whole == 201 and got.cost == 3  # rows 7 and 9 (200 chunks each) + documents
    assert got.slices == (
        Slice("c/7", recursive=True),
        Slice("c/9", recursive=True),
        Slice("", recursive=False, starts="zarr.json"),
    )
    assert got.covers == ("c/7/", "c/9/", "zarr.json")


def test_deeper_rows_when_a_row_is_itself_many_pages() -> None:
    grid = Grid((10, 5000, 1), "c/")  # a row of the first dimension is 5 pages
    got = plan(["c/3/17/0", "c/3/18/0"], grid, 1000)
    assert got is not None and got.cost == 2
    assert [s.folder for s in got.slices] == ["c/3/17", "c/3/18"]


def test_the_whole_folder_when_rows_cost_as_much() -> None:
    grid = Grid((4, 4), "c/")
    assert plan(["c/0/0", "c/3/3"], grid, 1000) is None  # 1 page either way
    assert plan(["c/0/0", "odd-object"], Grid((4000, 4), "c/"), 1000) is None
    assert plan(["c/0/0"], None, 1000) is None  # no grid: the whole array


def test_a_group_lists_its_documents_only() -> None:
    got = plan([".zattrs", ".zgroup"], None, 1000)
    assert got is not None and got.cost == 1
    assert got.slices == (Slice("", recursive=False, starts=".z"),)
    empty = plan([], None, 1000)
    assert empty is not None and empty.slices == () and empty.cost == 0


def test_rows_of_flat_keys_are_name_prefixes() -> None:
    dotted = _v3([10, 10], [1, 1], name="default", configuration={"separator": "."})
    assert grid_of("a", {"a/zarr.json": dotted}.get) == Grid((10, 10), "c.", ".")
    v2 = {"zarr_format": 2, "shape": [3000, 4], "chunks": [1, 1]}  # v2's default "."
    grid = grid_of("v", {"v/.zarray": json.dumps(v2).encode()}.get)
    assert grid == Grid((3000, 4), "", ".")
    got = plan([".zarray", "7.0", "7.3", "12.1"], grid, 1000)  # 12,001 objects: 13 pages
    assert got is not None and got.cost == 3 and got.whole == 13
    assert got.slices == (
        Slice("", recursive=False, starts="12."),
        Slice("", recursive=False, starts="7."),
        Slice("", recursive=False, starts=".zarray"),
    )
    assert got.covers == ("12.", "7.", ".zarray")  # ("1." would also cover "12.0": not used)
