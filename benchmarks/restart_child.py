"""The "after a restart" column: a fresh Python process reading with persistent caches.

Driven by `run.py` over stdin/stdout, one line each way, so that the parent can
count the server's requests of each step separately:

    parent -> {"settings": ..., "readers": [[key, spec], ...]}
    child  -> READY                      (imports and a generic warm-up done)
    for each reader:
      parent -> OPEN;  child -> OPENED   (dataset opened: metadata requests)
      parent -> READ;  child -> {"seconds": ..., "correct": ...}

The generic warm-up (dask's thread pool, zarr's event loop and codecs, xarray's
backend machinery, on a tiny in-memory array) runs before any reader, so the first
reader measured does not pay for one-time costs of the interpreter. Readers run in
the order given; the parent puts xarray-zcache first.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _warm_up(threads: int) -> None:
    import dask
    import numpy as np
    import xarray as xr
    from zarr.storage import MemoryStore

    store = MemoryStore()
    ds = xr.Dataset({"v": (("t", "y", "x"), np.ones((4, 8, 8), dtype="float32"))})
    ds.to_zarr(store, zarr_format=3, consolidated=True, encoding={"v": {"chunks": (1, 8, 8)}})
    back = xr.open_dataset(store, engine="zarr", chunks={})
    with dask.config.set(scheduler="threads", num_workers=threads):
        back["v"].mean(("y", "x")).compute()


def main() -> int:
    from common import (
        Settings,
        analysis,
        expected_result,
        make_dataset,
        quiet,
        silence_unclosed_sessions,
    )
    from readers import opener

    silence_unclosed_sessions()
    job = json.loads(sys.stdin.readline())
    s = Settings.from_dict(job["settings"])
    expect = expected_result(make_dataset(s))
    with quiet():
        _warm_up(s.threads)
    print("READY", flush=True)
    import time

    import numpy as np

    for key, spec in job["readers"]:
        assert sys.stdin.readline().strip() == "OPEN"
        open_ = opener(spec)
        with quiet():
            ds = open_()
        print("OPENED", flush=True)
        assert sys.stdin.readline().strip() == "READ"
        t0 = time.perf_counter()
        got = analysis(ds, s.threads)
        seconds = time.perf_counter() - t0
        ds.close()
        extra = {}
        cfg = getattr(open_, "config", None)
        if cfg is not None:
            from xarray_zcache.registry import get_cache

            st = get_cache(cfg).stats()
            extra = {
                "disk_hits": st.total_hits(kind="chunk", tier="disk"),
                "memory_hits": st.total_hits(kind="chunk", tier="memory"),
                "misses": st.total_misses(kind="chunk"),
            }
        print(
            json.dumps(
                {
                    "key": key,
                    "seconds": seconds,
                    "correct": bool(np.allclose(got, expect, rtol=1e-5)),
                    **extra,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
