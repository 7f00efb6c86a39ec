"""Profile one xarray-zcache path with py-spy (all threads), with the same data as `run.py`.

Usage (from the repository root; needs ``pip install py-spy``)::

    .venv/bin/python benchmarks/profiling.py warm            # one scenario
    .venv/bin/python benchmarks/profiling.py all             # every scenario
    .venv/bin/python benchmarks/profiling.py summary FILE    # re-summarise a raw profile

Setup (local S3 in its own process, the dataset, filling caches) is not profiled:
the script attaches ``py-spy record --threads`` to itself only around the measured
part, writes the raw collapsed stacks to ``benchmarks/results/profile-<scenario>.txt``
and prints a summary: the samples per thread, the functions with the most samples
on top of the stack ("self"), and the xarray-zcache / zarr / asyncio frames with
the most samples below them ("inclusive"). Without ``--idle`` py-spy drops samples
of threads that are waiting (sleeping, blocked on a lock or on I/O), so the profile
shows where CPU time goes; ``--gil`` keeps only the thread holding the GIL.

Scenarios (each compares with its reference, profiled the same way):

``cold`` / ``cold-nocache``
    A cold full read through xarray-zcache (memory + disk, default config) / with
    ``engine="zarr"`` and s3fs ``max_concurrency=1``.
``warm`` / ``warm-memorystore``
    ``--loops`` warm full reads from xarray-zcache's memory tier / from a MemoryStore.
``warm-after-cold``
    The warm read right after a cold read into a memory + disk cache (background
    disk writes still running).
``disk`` / ``disk-localstore``
    A full read served by the disk tier (a new cache on the same folder, memory
    empty) / the same read from a LocalStore copy.
``restart`` / ``restart-localstore``
    The full read of `run.py`'s "after restart" column: a fresh Python process
    (`restart_child.py`, py-spy follows it) reading from the disk tier filled by a
    cold read / from the LocalStore copy. Only the samples under the timed read
    (``analysis``) are summarised.
``memhit`` / ``memhit-memorystore``
    ``CachedStore.get`` memory hits of one 1 MiB value in a loop / ``MemoryStore.get``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SCENARIOS = (
    "cold",
    "cold-nocache",
    "warm",
    "warm-memorystore",
    "warm-after-cold",
    "disk",
    "disk-localstore",
    "restart",
    "restart-localstore",
    "memhit",
    "memhit-memorystore",
)


def pyspy() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else shutil.which("py-spy") or "py-spy"


@contextlib.contextmanager
def recording(
    out: str, rate: int, idle: bool, gil: bool, subprocesses: bool = False
) -> Iterator[None]:
    """py-spy attached to this process for the duration of the block (raw collapsed stacks)."""
    cmd = [pyspy(), "record", "--pid", str(os.getpid()), "-f", "raw", "-o", out]
    cmd += ["-r", str(rate), "--threads", "--nonblocking"]
    if subprocesses:
        cmd.append("--subprocesses")
    if idle:
        cmd.append("--idle")
    if gil:
        cmd.append("--gil")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let py-spy attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGINT) and not os.path.exists(out):
            print(f"py-spy failed ({proc.returncode}): {err}", file=sys.stderr)


# -- summary ------------------------------------------------------------------------------------


def _parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            stacks.append((stack.split(";"), int(n)))
    return stacks


def _short(frame: str) -> str:
    """``func (path/to/xarray_zcache/store.py:123)`` -> ``func (xarray_zcache/store.py:123)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.12/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def summarize(path: str, top: int = 15, focus: str | None = None) -> str:
    # --subprocesses: "process <pid>:<cmdline>" frames (parent, child) first: drop them
    stacks = [([fr for fr in f if not fr.startswith("process ")], n) for f, n in _parse(path)]
    if focus:  # the main thread only under ``focus``; the other threads (pools, loops) all
        stacks = [
            (f, n)
            for f, n in stacks
            if not any(": MainThread" in fr for fr in f[:2]) or any(focus in fr for fr in f)
        ]
    total = sum(n for _, n in stacks)
    if not total:
        return f"{path}: no samples"
    threads: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    incl_z: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    with_z = 0
    libs = ("zarr/", "asyncio/", "s3fs/", "fsspec/", "botocore/", "aiohttp/", "numcodecs/")
    for frames, n in stacks:
        thread = frames[0] if frames and frames[0].startswith("thread") else "?"
        name = thread.partition("): ")[2] or thread
        threads[re.sub(r"[-_]\d+$", "_N", name)[:60]] += n
        body = frames[1:] if thread != "?" else frames
        if body:
            self_[_short(body[-1])] += n
        seen = set()
        for fr in body:
            s = _short(fr)
            if s in seen:
                continue
            seen.add(s)
            if "xarray_zcache/" in fr:
                incl_z[s] += n
            elif any(k in fr for k in libs):
                incl[s] += n
        with_z += n if any("xarray_zcache/" in fr for fr in body) else 0
    pct = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731
    lines = [
        f"{os.path.basename(path)}: {total} samples, {pct(with_z)} with an xarray_zcache frame"
    ]
    lines.append("  threads:")
    lines += [f"    {pct(n)}  {t}" for t, n in threads.most_common(8)]
    lines.append("  self (top of stack):")
    lines += [f"    {pct(n)}  {f}" for f, n in self_.most_common(top)]
    if incl_z:
        lines.append("  inclusive, xarray_zcache frames:")
        lines += [f"    {pct(n)}  {f}" for f, n in incl_z.most_common(top)]
    lines.append("  inclusive, library frames (zarr, asyncio, s3fs, fsspec, botocore, aiohttp):")
    lines += [f"    {pct(n)}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


# -- scenarios ----------------------------------------------------------------------------------


class Env:
    """The S3 server, the dataset, a scratch folder (shared by the scenarios of a run)."""

    def __init__(self, latency: float, threads: int) -> None:
        from common import BUCKET, DATASET, Settings, write_datasets
        from readers import copy_to_local, memory_store_from
        from s3proc import S3Process

        self.s = Settings(latency=latency, threads=threads)
        self.server = S3Process(0.0)
        self.server.create_bucket(BUCKET)
        write_datasets(self.s, self.server.storage_options(skip_instance_cache=True))
        self.work = tempfile.mkdtemp(prefix="zcache-profile-")
        self.local = os.path.join(self.work, "local")
        copy_to_local(self.server.filesystem(), f"{BUCKET}/{DATASET}", self.local)
        self.mem = memory_store_from(self.local)
        self.server.latency = latency
        self.n = 0
        from common import quiet
        from restart_child import _warm_up

        with quiet():  # one-time costs (dask imports distributed at its first compute...)
            _warm_up(threads)

    def zcache(self, disk: bool, name: str | None = None, path: str | None = None) -> Any:
        from readers import opener, zcache_config

        self.n += 1
        name = name or f"profile-{self.n}"
        d = (path or os.path.join(self.work, f"zc-{self.n}")) if disk else None
        spec = {
            "type": "zcache",
            "url": self.s.url(),
            "so": self.server.default_storage_options(),  # no tag: obstore inside
            "config": zcache_config(name, d),
        }
        return opener(spec)

    def read(self, open_: Callable[[], Any]) -> Callable[[], Any]:
        from common import analysis, quiet

        with quiet():
            ds = open_()
        return lambda: analysis(ds, self.s.threads)

    def close(self) -> None:
        from xarray_zcache.registry import close_all

        close_all()  # flush and close every cache before its folder goes
        self.server.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def prepare(env: Env, scenario: str, loops: int) -> tuple[Callable[[], Any], str]:
    """Set up ``scenario``; return the function to profile and a description."""
    from readers import opener

    from xarray_zcache.registry import get_cache

    if scenario == "cold":
        read = env.read(env.zcache(disk=True))
        return read, "cold full read, xarray-zcache memory + disk"
    if scenario == "cold-nocache":
        spec = {"type": "zarr", "url": env.s.url(), "so": env.server.storage_options("nocache")}
        return env.read(opener(spec)), 'cold full read, engine="zarr", max_concurrency=1'
    if scenario in ("warm", "warm-after-cold"):
        open_ = env.zcache(disk=scenario == "warm-after-cold")
        read = env.read(open_)
        read()  # cold
        if scenario == "warm-after-cold":
            return read, "warm read right after the cold read (memory + disk)"
        get_cache(open_.config).flush()
        read()
        return _loop(read, loops), f"{loops} warm full reads from the memory tier"
    if scenario == "warm-memorystore":
        read = env.read(opener({"type": "memorystore", "store": env.mem}))
        read()
        return _loop(read, loops), f"{loops} full reads from a zarr MemoryStore"
    if scenario == "disk":
        path = os.path.join(env.work, "disk-scenario")
        first = env.zcache(disk=True, name="profile-disk-fill", path=path)
        env.read(first)()
        get_cache(first.config).close()
        second = env.zcache(disk=True, name="profile-disk-read", path=path)
        return env.read(second), "full read served by the disk tier (new cache, memory empty)"
    if scenario == "disk-localstore":
        read = env.read(opener({"type": "localstore", "path": env.local}))
        return read, "full read from a zarr LocalStore copy"
    if scenario in ("restart", "restart-localstore"):
        if scenario == "restart":
            path = os.path.join(env.work, "restart-scenario")
            first = env.zcache(disk=True, name="profile-restart", path=path)
            env.read(first)()
            get_cache(first.config).close()
            spec = {
                "type": "zcache",
                "url": env.s.url(),
                "so": env.server.default_storage_options(),
                "config": first.config.to_dict(),
            }
        else:
            spec = {"type": "localstore", "path": env.local}
        return _child(env, spec), f"{scenario}: full read in a fresh process"
    if scenario in ("memhit", "memhit-memorystore"):
        return _memhit(env, scenario == "memhit", loops), f"{scenario}: get loop"
    raise SystemExit(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")


def _child(env: Env, spec: dict[str, Any]) -> Callable[[], None]:
    """Run `restart_child.py` on ``spec`` (its OPEN/READ handshake answered up front)."""
    import json

    job = json.dumps({"settings": env.s.to_dict(), "readers": [["r", spec]]})

    def run() -> None:
        subprocess.run(
            [sys.executable, os.path.join(HERE, "restart_child.py")],
            input=f"{job}\nOPEN\nREAD\n",
            text=True,
            capture_output=True,
            check=True,
        )

    return run


def _loop(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


def _memhit(env: Env, zcache: bool, loops: int) -> Callable[[], None]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore, MemoryStore

    from xarray_zcache import CacheConfig, CachedStore

    proto = default_buffer_prototype()
    value = proto.buffer.from_bytes(os.urandom(1 << 20))
    key = "micro/c/0"
    env.server.filesystem().pipe_file(f"zcache-bench/{key}", value.to_bytes())
    if zcache:
        cfg = CacheConfig().with_name("profile-memhit").with_memory_size(64 << 20)
        inner = FsspecStore.from_url(
            "s3://zcache-bench",
            storage_options=env.server.storage_options("memhit"),
            read_only=True,
        )
        store: Any = CachedStore(inner, cfg.without_disk_cache())
        sync(store.get(key, proto))
    else:
        store = MemoryStore()
        sync(store.set(key, value))
    n = 20_000 * loops

    async def run() -> None:
        get = store.get
        for _ in range(n):
            await get(key, proto)

    return lambda: sync(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenario", help=f"one of {', '.join(SCENARIOS)}, 'all', or 'summary'")
    p.add_argument("file", nargs="?", help="raw profile to summarise (with 'summary')")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--loops", type=int, default=5, help="repetitions of the warm/memhit parts")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--idle", action="store_true", help="also sample waiting threads")
    p.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--focus", default=None, help="summary: only stacks with this frame text")
    args = p.parse_args(argv)
    if args.scenario == "summary":
        print(summarize(args.file, focus=args.focus))
        return 0
    from common import quiet, silence_unclosed_sessions

    silence_unclosed_sessions()
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    os.makedirs(args.out, exist_ok=True)
    env = Env(args.latency_ms / 1000, args.threads)
    try:
        for sc in scenarios:
            with quiet():
                fn, what = prepare(env, sc, args.loops)
            out = os.path.join(args.out, f"profile-{sc}.txt")
            child = sc.startswith("restart")
            with quiet(), recording(out, args.rate, args.idle, args.gil, subprocesses=child):
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            print(f"== {sc}: {what}: {seconds:.3f} s" + (" (whole child process)" if child else ""))
            if os.path.exists(out):
                print(summarize(out, focus="analysis (common.py" if child else None))
            print()
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
