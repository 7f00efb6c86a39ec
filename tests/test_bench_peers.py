"""`benchmarks/peers.py` (issue 19 item 6) runs in quick mode on tiny data.

Behaviour only: every reader whose library is installed has its row, every read
returned values bit-identical to the data written, the table and the plot are
written. Never a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow

#: row key -> the library it needs ("" : zarr and xarray only)
ROWS = {
    "zc_s3fs": "s3fs",
    "zc_obstore": "obstore",
    "zc_disk": "obstore",
    "bare": "obstore",
    "icechunk": "icechunk",
    "memorystore": "",
    "arr_zcache": "obstore",
    "arr_decoded": "obstore",
    "arr_bare": "obstore",
    "arr_memorystore": "",
    "ts_cache": "tensorstore",
    "ts_nocache": "tensorstore",
}


@pytest.fixture(scope="module")
def peers() -> Any:
    pytest.importorskip("moto")
    pytest.importorskip("obstore")  # the raw-fetch floor
    sys.path.insert(0, str(BENCH))
    try:
        import peers as module
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def outputs(peers: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("peers")
    argv = ["--quick", "--latency", "0", "--reads", "2", "--threads", "2"]
    argv += ["--json", str(out / "peers.json"), "--md", str(out / "peers.md")]
    argv += ["--workdir", str(out)]
    plot = out / "peers.png"
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(plot)]
    except ImportError:
        plot = None  # type: ignore[assignment]
    assert peers.main(argv) == 0
    return {
        "res": json.loads((out / "peers.json").read_text()),
        "md": (out / "peers.md").read_text(),
        "plot": plot,
    }


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_installed_reader_has_its_row(peers: Any, outputs: dict[str, Any], key: str) -> None:
    if ROWS[key]:
        pytest.importorskip(ROWS[key])
    (lat,) = outputs["res"]["latencies"]
    row = lat["rows"][key]
    assert "error" not in row and len(row["runs"]) == 1
    assert row["label"] in outputs["md"]
    assert [r["digest"] for r in row["runs"]] == outputs["res"]["digest"]


def test_values_identical_across_readers_and_to_the_data(outputs: dict[str, Any]) -> None:
    res = outputs["res"]
    assert res["identical"] is True and len(res["digest"]) == 1
    assert "all values bit-identical: True" in outputs["md"]


def test_caches_serve_warm_reads_without_requests(outputs: dict[str, Any]) -> None:
    (lat,) = outputs["res"]["latencies"]
    rows = lat["rows"]
    for key in ("zc_obstore", "zc_disk", "arr_zcache", "arr_decoded"):
        assert rows[key]["cold_requests"]["chunk_get"] > 0
        assert rows[key]["warm_requests"] == 0, key
    assert rows["bare"]["warm_requests"] > 0  # no cache: S3 again
    if "ts_cache" in rows:
        assert rows["ts_cache"]["warm_requests"] == 0


def test_floor_targets_and_decoded_note(peers: Any, outputs: dict[str, Any]) -> None:
    res = outputs["res"]
    (lat,) = res["latencies"]
    floor = lat["floor"]
    assert floor["objects"] == res["n_chunks"] and floor["best_concurrency"] in (8, 16, 32)
    assert "raw-fetch floor" in outputs["md"]
    targets = lat["rows"]["zc_obstore"]["targets"]
    assert "bare" in targets and all(isinstance(t["pass"], bool) for t in targets.values())
    if peers.has_decoded_tier():
        assert "zc_decoded" in lat["rows"]
    else:
        assert any("decoded" in note for note in res["notes"])
    if outputs["plot"] is not None:
        assert outputs["plot"].stat().st_size > 10_000
