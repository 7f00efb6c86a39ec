"""Memory held by a process reading through the cache, against what it is configured to hold.

Issue 19's target: the memory a process holds for the cache is at most the memory tier
plus the decoded tier plus 10 %. This reads a dataset several times larger than both
tiers (so both fill and evict) through xarray + Dask, with a reduction (its result is
small: what stays is what the cache holds), and reports

* the growth of the process's resident memory (``VmRSS``, after ``gc.collect()`` and
  glibc's ``malloc_trim(0)``, which hands freed heap back) from a baseline taken after
  the same code ran once on a tiny dataset (imports, thread pools, zarr's and dask's
  own caches),
* what `pympler.asizeof` finds in the two tiers (their tables, keys, bytes and arrays),
* what the tiers account (``memory_used`` + ``decoded_used``) and their capacities.

    python benchmarks/memory_held.py                       # 192 MiB read, 32 + 16 MiB tiers
    python benchmarks/memory_held.py --mib 64 --memory 16MiB --decoded 8MiB --json out.json

Runs in its own process (the figures are this process's); no S3 (a local zarr folder:
the bytes held are the same whatever the source).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
from typing import Any


def rss() -> int:
    """Resident set size of this process in bytes, after handing freed heap back."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _write(path: str, mib: int, name: str) -> None:
    import numpy as np
    import xarray as xr
    from zarr.codecs import ZstdCodec

    side = 256
    nt = max(1, mib * 2**20 // (side * side * 4))
    rng = np.random.default_rng(0)
    # smooth fields plus noise: compress like real data (about 2x with zstd)
    base = rng.standard_normal((side, side)).astype("f4")
    t = np.stack(
        [base + 0.01 * i + rng.standard_normal((side, side)).astype("f4") * 0.1 for i in range(nt)]
    )
    ds = xr.Dataset({"t": (("time", "y", "x"), t.round(2))})
    enc = {"t": {"chunks": (1, 128, 128), "compressors": [ZstdCodec(level=1)]}}
    ds.to_zarr(os.path.join(path, name), mode="w", zarr_format=3, encoding=enc)


def _decoded_footprint(tier: Any) -> int:
    """Bytes the decoded tier keeps alive: keys, tokens (the encoded bytes) and each array's
    whole buffer (walking ``.base`` to the owner: a view keeps all of its base alive).
    `pympler.asizeof` cannot size NumPy arrays here (it fails on them), so this counts them
    by hand, each buffer once."""
    import numpy as np

    seen: set[int] = set()
    total = sys.getsizeof(tier._table)
    for key, (token, array, _cost, spec) in list(tier._table.items()):
        total += sys.getsizeof(key) + sys.getsizeof(spec)
        if id(token) not in seen:
            seen.add(id(token))
            total += sys.getsizeof(token)
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        owner = root.base if root.base is not None else root
        if id(owner) not in seen:
            seen.add(id(owner))
            total += root.nbytes if owner is root else sys.getsizeof(owner)
    return total


def measure(mib: int, memory: str, decoded: str, threads: int, passes: int) -> dict[str, Any]:
    import dask
    import xarray as xr
    from dask.utils import parse_bytes
    from pympler.asizeof import asizeof

    from xarray_zcache import CacheConfig, get_cache

    work = tempfile.mkdtemp(prefix="zcache-memory-held-")
    _write(work, 2, "tiny.zarr")
    _write(work, mib, "data.zarr")
    cfg = (
        CacheConfig()
        .with_name(f"held-{os.getpid()}")
        .with_memory_size(memory)
        .without_disk_cache()
        .with_decoded_memory_size(decoded)
    )

    def read(name: str) -> float:
        ds = xr.open_dataset(os.path.join(work, name), engine="zcache", chunks={}, cache_config=cfg)
        with dask.config.set(scheduler="threads", num_workers=threads):
            value = float(ds.t.mean().compute())
        ds.close()
        return value

    read("tiny.zarr")
    cache = get_cache(cfg)
    cache.memory_tier.clear()
    cache.decoded_tier.clear()
    base = rss()
    for _ in range(passes):
        read("data.zarr")
    after = rss()
    stats = cache.stats()
    held = asizeof(cache.memory_tier) + _decoded_footprint(cache.decoded_tier)
    capacity = parse_bytes(memory) + parse_bytes(decoded)
    return {
        "data_mib": mib,
        "memory_capacity": parse_bytes(memory),
        "decoded_capacity": parse_bytes(decoded),
        "accounted": stats.memory_used + stats.decoded_used,
        "asizeof_tiers": held,
        "rss_growth": after - base,
        "ratio_rss": (after - base) / capacity,
        "ratio_asizeof": held / capacity,
        "decoded_evictions": stats.decoded_evictions,
        "memory_evictions": stats.evictions.get("memory", 0),
    }


def _child(args: argparse.Namespace, memory: str, decoded: str) -> dict[str, Any]:
    """`measure` in a fresh process (each figure is one process's own)."""
    import subprocess

    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--child", "--mib", str(args.mib), "--memory", memory]
    cmd += ["--decoded", decoded, "--threads", str(args.threads), "--passes", str(args.passes)]
    subprocess.run([*cmd, "--json", out], check=True, stderr=subprocess.DEVNULL)
    with open(out) as f:
        result: dict[str, Any] = json.load(f)
    os.unlink(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=192, help="dataset size (decoded), MiB")
    p.add_argument("--memory", default="32MiB")
    p.add_argument("--decoded", default="16MiB")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        r = measure(args.mib, args.memory, args.decoded, args.threads, args.passes)
        with open(args.json, "w") as f:
            json.dump(r, f)
        return
    r = _child(args, args.memory, args.decoded)
    control = _child(args, "1MiB", "0")
    mib = 2**20
    cap = (r["memory_capacity"] + r["decoded_capacity"]) / mib
    beyond = (r["rss_growth"] - control["rss_growth"]) / mib
    print(
        f"\n{r['data_mib']} MiB read {args.passes}x through xarray + Dask ({args.threads} "
        f"threads); memory tier {args.memory} + decoded tier {args.decoded} = {cap:.0f} MiB\n"
    )
    print("| figure | MiB | / configured tiers |")
    print("|---|---:|---:|")
    rows = [
        ("accounted by the tiers (memory_used + decoded_used)", r["accounted"] / mib),
        (
            "held by the two tiers (pympler.asizeof; arrays by their buffers)",
            r["asizeof_tiers"] / mib,
        ),
        ("growth of the process's RSS", r["rss_growth"] / mib),
        (
            "growth of the RSS of the same run with 1 MiB tiers (control)",
            control["rss_growth"] / mib,
        ),
        ("growth beyond the control: what the cache holds", beyond),
    ]
    for name, value in rows:
        print(f"| {name} | {value:.1f} | {value / cap:.2f}x |")
    print(f"\nevictions: memory {r['memory_evictions']}, decoded {r['decoded_evictions']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": r, "control": control}, f)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
