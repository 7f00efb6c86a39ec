"""The disk tier at a million entries (issue 19, item 4).

Fills a fresh folder with ``N`` entries through the path the cache uses (``DiskWriter``, the
background writer fed by ``HybridCache._admit``), then measures, at each size:

* fill rate (entries/s through the writer, flushed);
* index bytes per entry (``index.db`` + WAL);
* open time of the filled folder by a **new process** (``DiskTier(path, capacity)``), page
  cache warm and, where permitted, after ``drop_caches``;
* hit latency of ``DiskTier.get`` on random keys, split into the device/kernel part (the
  bare ``open`` + ``fstat`` + ``pread`` + ``close`` of the same files, measured in a pass
  of its own under the same cache state) and the cache's own work (the rest: hashing, header
  and checksum checks, access statistics, their batched index writes), with

  - ``first``: first read since the fill (the fill left the pages in the page cache);
  - ``warm``: read again, the page cache holding them;
  - ``cold-data``: ``posix_fadvise(DONTNEED)`` on each file first: its data pages are
    dropped, the dentry and inode stay cached (what "the page cache is cold" means for the
    cache's own layout: one device read per hit is the floor);
  - ``cold-all``: ``echo 3 > /proc/sys/vm/drop_caches`` first (root only): dentries,
    inodes, directory blocks are dropped too (the filesystem's lookups then add reads); the
    tier is the one of the passes before, its SQLite page cache holding what they read;
  - ``cold-new``: ``drop_caches``, then a tier opened afresh (an empty SQLite page cache)
    reads keys no pass read before: the first hit on a key after a restart, every index page
    it needs read from the device;

  with the bytes this process read from the device per hit (``/proc/self/io``
  ``read_bytes``) and the device's read requests per hit (``/proc/diskstats``, system-wide:
  other processes add noise);
* ``might_contain`` for a present and an absent key; ``key in tier`` (one SQL lookup);
* eviction: ``evict()`` of 1 % of the bytes, and the one ``put`` that finds the tier full.

``--index-cache-mib`` bounds the SQLite page cache of the tiers that read
(``DiskTier(index_cache_bytes=...)``).

Usage::

    python benchmarks/disk_scale.py --entries 1000,100000,1000000 --size 1024
    python benchmarks/disk_scale.py --entries 20000 --size 1048576 --reads 500   # large entries

Prints markdown tables; ``--json PATH`` also writes every figure. Uses ``--dir`` (default
``/tmp/zcache-disk-scale``) and deletes what it created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

NS = "s3://bench/dataset.zarr"
DROP_CACHES = "/proc/sys/vm/drop_caches"


def key_of(i: int) -> str:
    # zarr v3 chunk keys of a 3-D variable, 1000 x 1000 chunk grid per time step
    return f"{NS}/t2m/c/{i // 1_000_000}/{(i // 1000) % 1000}/{i % 1000}"


def payload(i: int, base: bytes) -> bytes:
    return i.to_bytes(8, "little") + base[8:]


# -- system counters -----------------------------------------------------------------------------


def proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def device_of(path: str) -> str | None:
    """The /proc/diskstats name of the block device holding ``path`` (best effort)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if int(parts[0]) == major and int(parts[1]) == minor:
                return parts[2]
    return None


def device_reads(dev: str | None) -> int:
    if dev is None:
        return 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == dev:
                return int(parts[3])
    return 0


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def fadvise_dontneed(locs: list[Loc]) -> None:
    os.sync()  # DONTNEED leaves dirty pages (the fill's) in the page cache
    for p in dict.fromkeys(p for p, _o, _n in locs):
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- measurements --------------------------------------------------------------------------------


def percentiles(lat_ns: list[int]) -> dict[str, float]:
    s = sorted(lat_ns)
    n = len(s)
    return {
        "median_us": s[n // 2] / 1e3,
        "mean_us": sum(s) / n / 1e3,
        "p99_us": s[min(n - 1, int(n * 0.99))] / 1e3,
    }


#: Where an entry's bytes are: a payload file (offset and length None: read whole) or
#: ``length`` bytes at ``offset`` of a segment file.
Loc = tuple[str, int | None, int | None]


def raw_pass(paths: list[Loc]) -> list[int]:
    """What any reader of these bytes pays: for a file, open, fstat, one pread of the file,
    close; for a record, one pread from an open descriptor of its segment (opened before)."""
    out = []
    fds: dict[str, int] = {}
    for p, offset, length in paths:
        if offset is not None and length is not None:
            if p not in fds:
                fds[p] = os.open(p, os.O_RDONLY)
            t0 = time.perf_counter_ns()
            os.pread(fds[p], length, offset)
            out.append(time.perf_counter_ns() - t0)
            continue
        t0 = time.perf_counter_ns()
        fd = os.open(p, os.O_RDONLY)
        st = os.fstat(fd)
        os.pread(fd, st.st_size, 0)
        os.close(fd)
        out.append(time.perf_counter_ns() - t0)
    for fd in fds.values():
        os.close(fd)
    return out


def locations(path: str, keys: list[str]) -> list[Loc]:
    """Where the entries of ``keys`` are (from the index rows)."""
    import sqlite3

    from xarray_zcache.cache.disk.format import digest, payload_path
    from xarray_zcache.cache.disk.segments import record_length, segment_path

    out: list[Loc] = []
    with contextlib.closing(sqlite3.connect(os.path.join(path, "index.db"))) as conn:
        for k in keys:
            row = conn.execute(
                "SELECT kind, size, namespace, segment, offset FROM entries WHERE key = ?", (k,)
            ).fetchone()
            kind, size, ns, segment, offset = row
            if segment is None:
                out.append((payload_path(path, digest(k).hex(), kind), None, None))
            else:
                length = record_length(k.encode(), ns.encode(), size)
                out.append((segment_path(path, segment), offset, length))
    return out


def get_pass(tier: Any, keys: list[str]) -> list[int]:
    out = []
    for k in keys:
        t0 = time.perf_counter_ns()
        v = tier.get(k)
        out.append(time.perf_counter_ns() - t0)
        if v is None:
            raise AssertionError(f"miss on {k!r}")
    return out


def timed_flushes(tier: Any) -> list[int]:
    """Wrap ``tier._flush`` to record the time spent writing access statistics."""
    spent: list[int] = []
    original = tier._flush

    def flush(*, blocking: bool) -> None:
        t0 = time.perf_counter_ns()
        try:
            original(blocking=blocking)
        finally:
            spent.append(time.perf_counter_ns() - t0)

    tier._flush = flush
    return spent


def measure_reads(
    tier: Any,
    keys: list[str],
    paths: list[Loc],
    mode: str,
    dev: str | None,
    prepare: Callable[[], None],
) -> dict[str, Any]:
    """One ``mode``: bare reads under ``prepare()``, then ``get`` under ``prepare()`` again.

    The access statistics the hits leave (last access and hit count of each entry, written
    to the index off the hit path) are held during the pass and written once after it, their
    device reads and bytes counted apart: a flush updates the row of each key read, whose
    leaf pages a cold page cache does not hold."""
    prepare()
    raw = raw_pass(paths)
    prepare()
    spent: list[int] = []
    real_flush = tier._flush
    tier._flush = lambda *, blocking: None  # held until the pass is over
    rb0, dr0 = proc_read_bytes(), device_reads(dev)
    lat = get_pass(tier, keys)
    rb1, dr1 = proc_read_bytes(), device_reads(dev)
    del tier._flush
    t0 = time.perf_counter_ns()
    real_flush(blocking=True)
    spent.append(time.perf_counter_ns() - t0)
    rb2, dr2 = proc_read_bytes(), device_reads(dev)
    n = len(keys)
    got, bare = percentiles(lat), percentiles(raw)
    return {
        "mode": mode,
        "get": got,
        "raw": bare,
        "own_mean_us": got["mean_us"] - bare["mean_us"],
        "own_median_us": got["median_us"] - bare["median_us"],
        "flush_us_per_hit": sum(spent) / n / 1e3,
        "read_kib_per_hit": (rb1 - rb0) / n / 1024,
        "device_reads_per_hit": (dr1 - dr0) / n,
        "stats_kib_per_hit": (rb2 - rb1) / n / 1024,
        "stats_device_reads_per_hit": (dr2 - dr1) / n,
    }


OPEN_SNIPPET = """
import sys, time
t0 = time.perf_counter()
from xarray_zcache.cache.disk import DiskTier
t1 = time.perf_counter()
tier = DiskTier(sys.argv[1], int(sys.argv[2]), location_map=sys.argv[3] == "1")
t2 = time.perf_counter()
n = len(tier)
t3 = time.perf_counter()
kd = tier._keydir
source = "none" if kd is None else "hint" if kd.ready else "rows"
if kd is not None and kd._building is not None:
    kd._building.join()  # built from the rows, in the background: how long it takes
t4 = time.perf_counter()
mapped = 0 if kd is None else kd.nbytes
tier.close()
print(t2 - t1, t3 - t2, n, t1 - t0, source, t4 - t1, mapped)
"""


def open_in_new_process(path: str, capacity: int, location_map: bool = True) -> dict[str, Any]:
    """Open the folder in a new process: open time, and where its location map came from
    (``hint``: the hint file, at open; ``rows``: built from the index in the background,
    ``mapped_s`` after the start of the open)."""
    out = subprocess.run(
        [sys.executable, "-c", OPEN_SNIPPET, path, str(capacity), "1" if location_map else "0"],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ,
    ).stdout.split()
    return {
        "open_s": float(out[0]),
        "len_s": float(out[1]),
        "entries": int(out[2]),
        "import_s": float(out[3]),
        "map_from": out[4],
        "mapped_s": float(out[5]),
        "map_bytes": int(out[6]),
    }


def map_from_rows(path: str, capacity: int) -> dict[str, Any]:
    """Open with the hint file set aside: the map is built from the index's rows."""
    from xarray_zcache.cache.disk.hint import hint_path

    aside = hint_path(path) + ".aside"
    os.replace(hint_path(path), aside)
    try:
        return open_in_new_process(path, capacity)
    finally:
        os.replace(aside, hint_path(path))


def fill(
    path: str, n: int, size: int, capacity: int, direct: bool, threshold: int
) -> dict[str, Any]:
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.writer import DiskWriter, PendingWrite

    base = os.urandom(size)
    tier = DiskTier(path, capacity, segment_threshold=threshold)
    dropped = [0]

    def on_drop() -> None:
        dropped[0] += 1

    writer = DiskWriter(tier, 256 << 20, on_drop)
    t0 = time.perf_counter()
    retries = 0
    for i in range(n):
        k = key_of(i)
        v = payload(i, base)
        if direct:
            tier.put(k, v, namespace=NS, fetch_started_ns=time.time_ns())
            continue
        item = PendingWrite(k, v, "chunk", NS, None, time.time_ns())
        while not writer.submit(item):  # the queue is full: let it drain (not a real drop)
            dropped[0] -= 1
            retries += 1
            time.sleep(0.005)
    writer.flush()
    elapsed = time.perf_counter() - t0
    writer.close()
    entries = len(tier)
    tier.close()
    if entries != n or dropped[0]:
        raise AssertionError(f"filled {entries} of {n} entries, {dropped[0]} dropped")
    return {"fill_s": elapsed, "fill_rate": n / elapsed, "queue_full_waits": retries}


def fs_floor(path: str, n: int, size: int) -> float:
    """Files/s of the bare filesystem work of a fill: create, write, close, rename, in the
    same layout (256 subfolders), for ``n`` files; nothing of the cache."""
    shutil.rmtree(path, ignore_errors=True)
    for i in range(256):
        os.makedirs(os.path.join(path, f"{i:02x}"), mode=0o700)
    data = os.urandom(size + 200)
    t0 = time.perf_counter()
    for i in range(n):
        final = os.path.join(path, f"{i % 256:02x}", f"{i:064x}.cache")
        temp = final + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.replace(temp, final)
    rate = n / (time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    return rate


def index_bytes(path: str) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = os.path.join(path, "index.db" + suffix)
        if os.path.exists(p):
            total += os.path.getsize(p)
    return total


def largest_dir(path: str) -> int:
    best = 0
    for sub in ("chunks", "metadata"):
        top = os.path.join(path, sub)
        if not os.path.isdir(top):
            continue
        stack = [top]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                entries = list(it)
            files = sum(1 for e in entries if e.is_file(follow_symlinks=False))
            best = max(best, files)
            stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    return best


def run_size(n: int, args: argparse.Namespace, dev: str | None) -> dict[str, Any]:
    from xarray_zcache.cache.disk import DiskTier

    path = os.path.join(args.dir, f"n{n}")
    shutil.rmtree(path, ignore_errors=True)
    capacity = 1 << 50
    res: dict[str, Any] = {"entries": n, "size": args.size}
    print(f"[{n:,}] filling ...", file=sys.stderr, flush=True)
    res.update(fill(path, n, args.size, capacity, args.direct_put, args.segment_threshold))
    print(f"[{n:,}] filled at {res['fill_rate']:,.0f}/s", file=sys.stderr, flush=True)
    # (at most ~2 GiB of files: the floor is a rate, not a second fill)
    res["fs_floor_rate"] = fs_floor(
        path + "-floor", min(n, 20_000, (2 << 30) // args.size), args.size
    )
    res["index_bytes"] = index_bytes(path)
    res["index_bytes_per_entry"] = res["index_bytes"] / n
    res["largest_dir_files"] = largest_dir(path)

    rng = random.Random(n)
    sample = [key_of(rng.randrange(n)) for _ in range(min(args.reads, n))]
    sample = list(dict.fromkeys(sample))
    paths = locations(path, sample)

    # a new process opens the folder (page cache warm: the fill just wrote it)
    mapping = not args.no_location_map
    res["location_map"] = mapping
    res["open_warm"] = min(
        (open_in_new_process(path, capacity, mapping) for _ in range(3)),
        key=lambda r: r["open_s"],
    )
    if mapping:
        res["map_from_rows"] = map_from_rows(path, capacity)
    tier_kw: dict[str, Any] = {"location_map": mapping}
    if args.index_cache_mib:
        tier_kw["index_cache_bytes"] = args.index_cache_mib << 20
    res["index_cache_mib"] = args.index_cache_mib
    tier = DiskTier(path, capacity, **tier_kw)
    reads = []
    noop: Callable[[], None] = lambda: None  # noqa: E731
    # "first": the same keys, first read since the fill (the bare pass reads other keys)
    other = [key_of(rng.randrange(n)) for _ in range(len(sample))]
    other_paths = locations(path, other)
    raw_first = raw_pass(other_paths)
    spent = timed_flushes(tier)
    lat = get_pass(tier, sample)
    del tier._flush
    got, bare = percentiles(lat), percentiles(raw_first)
    reads.append(
        {
            "mode": "first",
            "get": got,
            "raw": bare,
            "own_mean_us": got["mean_us"] - bare["mean_us"],
            "own_median_us": got["median_us"] - bare["median_us"],
            "flush_us_per_hit": sum(spent) / len(sample) / 1e3,
            "read_kib_per_hit": float("nan"),
            "device_reads_per_hit": float("nan"),
        }
    )
    reads.append(measure_reads(tier, sample, paths, "warm", dev, noop))
    reads.append(
        measure_reads(tier, sample, paths, "cold-data", dev, lambda: fadvise_dontneed(paths))
    )
    if args.cold_all and can_drop_caches():
        reads.append(measure_reads(tier, sample, paths, "cold-all", dev, drop_caches))

    # might_contain and the SQL lookup, warm
    absent = [f"{NS}/absent/{i}" for i in range(len(sample))]
    for name, fn, keys in (
        ("might_contain_hit", tier.might_contain, sample),
        ("might_contain_miss", tier.might_contain, absent),
        ("contains_sql", tier.__contains__, sample),
    ):
        t = []
        for k in keys:
            t0 = time.perf_counter_ns()
            fn(k)
            t.append(time.perf_counter_ns() - t0)
        res[name] = percentiles(t)
    if args.cold_all and can_drop_caches():
        tier.close()
        fresh = list(dict.fromkeys(key_of(rng.randrange(n)) for _ in range(len(sample))))
        fresh_paths = locations(path, fresh)
        tier = DiskTier(path, capacity, **tier_kw)
        reads.append(measure_reads(tier, fresh, fresh_paths, "cold-new", dev, drop_caches))
    res["reads"] = reads
    tier.close()

    if args.cold_all and can_drop_caches():
        drop_caches()
        res["open_cold"] = open_in_new_process(path, capacity, mapping)

    # eviction: evict() of 1 % of the bytes, then one put into a full tier
    tier = DiskTier(path, capacity)
    used = tier.used_bytes()
    t0 = time.perf_counter()
    freed = tier.evict(used - max(args.size, used // 100))
    res["evict_1pct_s"] = time.perf_counter() - t0
    res["evict_1pct_entries"] = tier.evictions
    tier.close()
    remaining = used - freed
    tier = DiskTier(path, remaining)
    t0 = time.perf_counter()
    ok = tier.put(f"{NS}/t2m/new", os.urandom(args.size), namespace=NS)
    res["put_when_full_s"] = time.perf_counter() - t0
    res["put_when_full_evicted"] = tier.evictions
    res["put_when_full_ok"] = ok
    tier.close()
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return res


# -- report --------------------------------------------------------------------------------------


def fmt(x: float, unit: str = "") -> str:
    if x != x:  # NaN
        return "—"
    if unit == "us":
        return f"{x:,.1f} µs" if abs(x) < 100 else f"{x:,.0f} µs"
    if unit == "s":
        return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"
    return f"{x:,.2f}"


def _mode(r: dict[str, Any], mode: str) -> dict[str, Any] | None:
    return next((m for m in r["reads"] if m["mode"] == mode), None)


def _rows_map(r: dict[str, Any]) -> str:
    built = r.get("map_from_rows")
    return (
        "—"
        if built is None
        else fmt(built["mapped_s"], "s") + " (open " + fmt(built["open_s"], "s") + ")"
    )


def summary(results: list[dict[str, Any]]) -> str:
    """The one table of issue 19 item 4: a row per size, the hit split into the cache's own
    work and the device read (the bare open + fstat + pread + close of the same files)."""
    lines = [
        "| entries | fill (entries/s) | filesystem alone (files/s) | open, new process "
        "| index B/entry "
        "| hit warm p50 / p99 | warm: own + device (mean) "
        "| hit cold p50 / mean | cold: own + device (mean) "
        "| device reads / hit, data cold / all cold / all cold, new tier "
        "| evict, per entry |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in results:
        warm = _mode(r, "warm")
        cold = _mode(r, "cold-data")
        cells = [f"{r['entries']:,}", f"{r['fill_rate']:,.0f}"]
        cells.append(f"{r.get('fs_floor_rate', nan):,.0f}")
        cells.append(fmt(r["open_warm"]["open_s"], "s"))
        cells.append(f"{r['index_bytes_per_entry']:,.0f}")
        for m in (warm, cold):
            if m is None:
                cells += ["—", "—"]
                continue
            second = m["get"]["p99_us"] if m is warm else m["get"]["mean_us"]
            cells.append(f"{fmt(m['get']['median_us'], 'us')} / {fmt(second, 'us')}")
            cells.append(f"{fmt(m['own_mean_us'], 'us')} + {fmt(m['raw']['mean_us'], 'us')}")
        every = _mode(r, "cold-all")
        fresh = _mode(r, "cold-new")
        cells.append(
            " / ".join(fmt(m["device_reads_per_hit"]) if m else "—" for m in (cold, every, fresh))
        )
        per = r["evict_1pct_s"] / r["evict_1pct_entries"] if r["evict_1pct_entries"] else nan
        cells.append(f"{fmt(per * 1e6, 'us')}")
        lines.append("| " + " | ".join(cells) + " |")
    first, last = results[0], results[-1]
    w0, w1 = _mode(first, "warm"), _mode(last, "warm")
    if len(results) > 1 and w0 and w1:
        lines += [
            "",
            f"Warm hit at {last['entries']:,} / at {first['entries']:,}: "
            f"{w1['get']['median_us'] / w0['get']['median_us']:.2f}x (median), "
            f"{w1['get']['mean_us'] / w0['get']['mean_us']:.2f}x (mean).",
        ]
    return "\n".join(lines)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Entries of {args.size:,} B, {args.reads:,} random keys per pass.",
        "",
        summary(results),
        "",
        "Details:",
        "",
        "| entries | fill (entries/s) | filesystem alone (files/s) | index B/entry "
        "| largest dir (files) | open, new process (warm / cold) | evict 1 % "
        "| put into a full tier (evicts) | location map: from | map MiB "
        "| map from the rows (no hint) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        cold = r.get("open_cold")
        opened = (
            fmt(r["open_warm"]["open_s"], "s") + " / " + (fmt(cold["open_s"], "s") if cold else "—")
        )
        lines.append(
            f"| {r['entries']:,} | {r['fill_rate']:,.0f} "
            f"| {r.get('fs_floor_rate', float('nan')):,.0f} "
            f"| {r['index_bytes_per_entry']:,.0f} "
            f"| {r['largest_dir_files']:,} | {opened} "
            f"| {fmt(r['evict_1pct_s'], 's')} ({r['evict_1pct_entries']:,}) "
            f"| {fmt(r['put_when_full_s'], 's')} ({r['put_when_full_evicted']:,}) "
            f"| {r['open_warm']['map_from']} | {r['open_warm']['map_bytes'] / 2**20:,.1f} "
            f"| {_rows_map(r)} |"
        )
    nan = float("nan")
    lines += [
        "",
        "Hit latency, `DiskTier.get` (mean; median in brackets). *device* = bare open + fstat + "
        "pread + close of the same files in the same cache state; *own* = get - device; "
        "*flush* = time spent writing access statistics to the index, per hit (on the "
        "flusher thread: not part of *get*).",
        "",
        "| entries | pass | get | device | own | flush (off the hit path) | KiB read / hit "
        "| device reads / hit | then the access statistics: KiB / device reads, per hit |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for m in r["reads"]:
            lines.append(
                f"| {r['entries']:,} | {m['mode']} | {fmt(m['get']['mean_us'], 'us')} "
                f"({fmt(m['get']['median_us'], 'us')}) | {fmt(m['raw']['mean_us'], 'us')} "
                f"| {fmt(m['own_mean_us'], 'us')} | {fmt(m['flush_us_per_hit'], 'us')} "
                f"| {fmt(m['read_kib_per_hit'])} | {fmt(m['device_reads_per_hit'])} "
                f"| {fmt(m.get('stats_kib_per_hit', nan))} / "
                f"{fmt(m.get('stats_device_reads_per_hit', nan))} |"
            )
    lines += [
        "",
        "| entries | might_contain, present | might_contain, absent | `key in tier` (SQL) |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['entries']:,} | {fmt(r['might_contain_hit']['mean_us'], 'us')} "
            f"| {fmt(r['might_contain_miss']['mean_us'], 'us')} "
            f"| {fmt(r['contains_sql']['mean_us'], 'us')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", default="1000,100000,1000000", help="comma-separated sizes")
    p.add_argument("--size", type=int, default=1024, help="payload bytes per entry")
    p.add_argument("--reads", type=int, default=2000, help="random keys per read pass")
    p.add_argument("--dir", default="/tmp/zcache-disk-scale", help="scratch folder")
    p.add_argument(
        "--no-location-map",
        action="store_true",
        help="tiers that read look every hit up in the index (DiskTier(location_map=False))",
    )
    p.add_argument(
        "--no-cold-all",
        dest="cold_all",
        action="store_false",
        help="skip the drop_caches pass (it drops every process's caches)",
    )
    p.add_argument(
        "--direct-put", action="store_true", help="fill with DiskTier.put instead of the DiskWriter"
    )
    p.add_argument(
        "--segment-threshold",
        type=int,
        default=-1,
        help="DiskTier(segment_threshold=...): entries up to this size go to segment files "
        "(65536: the designed size; -1: none, one file per entry)",
    )
    p.add_argument(
        "--index-cache-mib",
        type=int,
        default=0,
        help="DiskTier(index_cache_bytes=...) of the reading tiers, MiB (0: the default)",
    )
    p.add_argument("--keep", action="store_true", help="keep the filled folders")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--render", help="print the tables of an earlier --json file, run nothing")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        args.size, args.reads = saved["args"]["size"], saved["args"]["reads"]
        print(report(saved["results"], args))
        return
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    dev = device_of(args.dir)
    sizes = [int(x.replace("_", "")) for x in args.entries.split(",") if x]
    need = max(sizes) * (max(4096, args.size + 4096) + 300)
    free = shutil.disk_usage(args.dir).free
    if need > free * 0.8:
        sys.exit(f"not enough space in {args.dir}: ~{need / 2**30:.1f} GiB needed")
    results = []
    for n in sizes:
        results.append(run_size(n, args, dev))
        print(f"[{n:,}] done", file=sys.stderr, flush=True)
        print(report(results[-1:], args), file=sys.stderr, flush=True)
        if args.json:  # so far, in case a later size is interrupted
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    cold = "posix_fadvise(DONTNEED) per file (cold-data)"
    if args.cold_all and can_drop_caches():
        cold += " and echo 3 > /proc/sys/vm/drop_caches (cold-all)"
    print(f"Cold passes: {cold}. Device: {dev}.\n")
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    with contextlib.suppress(OSError):
        os.rmdir(args.dir)


if __name__ == "__main__":
    main()
