"""``python -m xarray_zcache.demo``: read one dataset cold, warm and after a restart.

With no arguments the demo needs nothing but this package: it starts an embedded
S3 server (moto, on 127.0.0.1, with an injected round-trip latency), writes a
small ERA5-like sample dataset to ``s3://zcache-demo/era5-sample.zarr`` (zarr
format 3), and reads it three times through ``engine="zcache"``:

1. **cold**: a fresh cache folder; every chunk comes from S3 and fills the memory
   and disk tiers;
2. **warm**: the same process and cache; every chunk comes from memory;
3. **restart**: a new Python process on the same cache folder; every chunk comes
   from disk.

Each pass computes the same reductions over every variable; the demo prints a
table of wall time, requests sent to S3 (counted by the server, so the restart
process's requests are seen too), bytes served by S3 / memory / disk and the hit
rate, and checks that the three results are identical. It exits with status 1
if the warm or restart pass sent a chunk request to S3 (it doubles as a smoke
test), 0 otherwise.

``--url s3://bucket/path.zarr`` (with ``--storage-option KEY=VALUE``) runs the
same three passes against any dataset instead; request counts then come from the
cache's own miss counters.

The package: `xarray_zcache.demo.sample` (the dataset), `xarray_zcache.demo.passes` (one
read each), `xarray_zcache.demo.report` (the tables) and `xarray_zcache.demo.cli` (`main`).
"""

from __future__ import annotations

from xarray_zcache.demo.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from xarray_zcache.demo.options import build_parser
from xarray_zcache.demo.passes import (
    PassFigures,
    ReadSpec,
    analysis,
    open_selected,
    run_cluster_pass,
    run_pass,
    run_restart_pass,
)
from xarray_zcache.demo.report import format_table, print_cluster_report
from xarray_zcache.demo.sample import (
    DEMO_BUCKET,
    DEMO_CACHE_NAME,
    DEMO_PATH,
    DEMO_URL,
    SAMPLE_CHUNKS,
    SAMPLE_SHAPE,
    make_sample_dataset,
    write_sample_dataset,
)

__all__ = [
    "DEMO_BUCKET",
    "DEMO_CACHE_NAME",
    "DEMO_PATH",
    "DEMO_URL",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SAMPLE_CHUNKS",
    "SAMPLE_SHAPE",
    "PassFigures",
    "ReadSpec",
    "analysis",
    "build_parser",
    "format_table",
    "main",
    "make_sample_dataset",
    "open_selected",
    "print_cluster_report",
    "run_cluster_pass",
    "run_pass",
    "run_restart_pass",
    "write_sample_dataset",
]
