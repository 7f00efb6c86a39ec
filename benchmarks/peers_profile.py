"""Where a cold read's time goes, for the rows of `peers.py` (issue 19 item 6).

Same server, data and readers as `peers.py`. For each chosen reader, ``--runs`` cold
reads (a fresh reader each time) split into open and read, with the CPU seconds of this
process (every thread: dask's, zarr's event loop, obstore's and TensorStore's runtimes)
beside the wall-clock; then one more cold read of each ``--profile`` reader under
``py-spy record --threads`` (`profiling.recording`), summarised by `profiling.summarize`
(raw stacks in ``benchmarks/results/profile-peers-<key>.txt``).

Usage::

    python benchmarks/peers_profile.py --latency 0.02 --runs 3
    python benchmarks/peers_profile.py --profile zc_obstore,bare --gil
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import peers
from common import median, quiet

DEFAULT_READERS = "zc_obstore,zc_disk,zc_s3fs,bare,arr_zcache,arr_bare,ts_nocache"


def cold(reader: peers.Reader, env: peers.Env, run: int, expected: Any) -> dict[str, float]:
    with peers.closing(env), quiet():
        open_ = reader.fresh(run)
        env.server.requests.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        read = open_()
        t1 = time.perf_counter()
        got = read()
        t2, c2 = time.perf_counter(), time.process_time()
        peers.check(reader, got, expected)
    return {"open": t1 - t0, "read": t2 - t1, "wall": t2 - t0, "cpu": c2 - c0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--readers", default=DEFAULT_READERS)
    p.add_argument("--profile", default="zc_obstore,bare", help="readers profiled with py-spy")
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--gil", action="store_true", help="py-spy: only the thread holding the GIL")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    from s3proc import S3Process

    for k, v in (
        ("AWS_ACCESS_KEY_ID", peers.KEY),
        ("AWS_SECRET_ACCESS_KEY", peers.SECRET),
        ("AWS_REGION", peers.REGION),
    ):
        os.environ.setdefault(k, v)
    scratch = tempfile.mkdtemp(prefix="zcache-peers-profile-")
    server = S3Process(latency=0.0)
    try:
        env = peers.Env(server, peers.settings_for(False), args.threads, scratch)
        expected = peers.write_data(env)
        readers, _ = peers.build_readers(env)
        wanted = args.readers.split(",")
        chosen = [r for r in readers if r.key in wanted]
        peers.warm_up(env, expected, chosen)
        server.latency = args.latency
        times: dict[str, list[dict[str, float]]] = {r.key: [] for r in chosen}
        for run in range(args.runs):
            for r in chosen:
                times[r.key].append(cold(r, env, run, expected))
        print(
            f"cold reads at {args.latency * 1000:g} ms, medians of {args.runs} "
            f"(load {os.getloadavg()[0]:.1f})\n"
        )
        print("| reader | open (s) | read (s) | open + read (s) | CPU (s) | CPU / wall |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in chosen:
            t = times[r.key]
            m = {k: median([x[k] for x in t]) for k in ("open", "read", "wall", "cpu")}
            print(
                f"| {r.label} | {m['open']:.3f} | {m['read']:.3f} | {m['wall']:.3f} "
                f"| {m['cpu']:.2f} | {m['cpu'] / m['wall']:.2f} |"
            )
        if args.profile:
            from profiling import recording, summarize

            os.makedirs(args.out, exist_ok=True)
            for key in args.profile.split(","):
                r = next((x for x in chosen if x.key == key), None)
                if r is None:
                    continue
                out = os.path.join(args.out, f"profile-peers-{key}.txt")
                with recording(out, args.rate, idle=False, gil=args.gil):
                    took = cold(r, env, 99, expected)
                print(f"\n## {r.label}: one cold read, {took['wall']:.2f} s (py-spy)\n")
                print(summarize(out, top=12) if os.path.exists(out) else "(no profile)")
    finally:
        from xarray_zcache.registry import close_all

        close_all()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
