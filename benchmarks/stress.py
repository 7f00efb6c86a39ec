"""The reliability suite of issue 6, run longer: ``make stress`` (``python benchmarks/stress.py``).

Runs the scenarios of ``xarray_zcache.testing.faults`` (the same code ``make test`` runs
briefly) with the counts given as flags, and prints the table of ``docs/reliability.md``:
faults injected, runs, wrong bytes returned and data lost per scenario. The exit status is 1
if any scenario returned a wrong byte, lost data or broke an invariant.

Examples
--------
::

    python benchmarks/stress.py                       # the default, a few minutes
    python benchmarks/stress.py --crash-rounds 500 --stress-ops 5000 --out table.md
    python benchmarks/stress.py --only crash,s3 --seed 7
    python benchmarks/stress.py --known-faults        # also the scenarios of the last faults fixed
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from xarray_zcache.testing import faults

HERE = pathlib.Path(__file__).resolve().parent

SCENARIOS = ("crash", "crash-points", "corruption", "concurrency", "stateful", "s3", "disk-full")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crash-rounds", type=int, default=100, help="SIGKILLs of a filling process")
    p.add_argument("--corruption-rounds", type=int, default=240, help="damaged folders")
    p.add_argument("--stress-processes", type=int, default=4)
    p.add_argument("--stress-threads", type=int, default=4)
    p.add_argument("--stress-ops", type=int, default=3000, help="operations per thread")
    p.add_argument("--stress-runs", type=int, default=3, help="repetitions of the stress run")
    p.add_argument("--stateful-examples", type=int, default=500, help="hypothesis examples")
    p.add_argument("--s3-cases", type=int, default=150, help="random faults from S3")
    p.add_argument("--disk-full-rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument(
        "--known-faults",
        action="store_true",
        help="also run the scenarios of the faults fixed last (writes through the cache "
        "killed mid-way; several processes writing one key)",
    )
    p.add_argument("--out", type=pathlib.Path, help="write the markdown table here too")
    p.add_argument("--json", type=pathlib.Path, help="write the results as JSON here")
    p.add_argument("--workdir", type=pathlib.Path, help="keep the scratch folders here")
    return p.parse_args(argv)


def _test_module(name: str) -> ModuleType:
    """The module ``tests/<name>.py``, loaded from its file (``tests`` is no package)."""
    path = HERE.parent / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _stateful(examples: int, seed: int) -> faults.ScenarioResult:
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    machines = _test_module("test_reliability_concurrency")  # the state machines and their tests
    result = faults.ScenarioResult("hypothesis state machine vs a reference store")
    steps = 50
    with faults.timed(result):
        for machine in (machines.CacheVsReference, machines.CacheOverMemoryStoreVsReference):
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=examples // 2,
                    stateful_step_count=steps,
                    deadline=None,
                    database=None,
                    derandomize=False,
                    suppress_health_check=list(HealthCheck),
                ),
            )
    result.runs = examples * steps  # upper bound: machines may stop early
    result.faults = 0
    result.note(f"{examples} examples of up to {steps} steps, LocalStore and MemoryStore")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("xarray_zcache").propagate = False  # the scenarios provoke warnings
    only = {s.strip() for s in args.only.split(",") if s.strip()} or set(SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        print(f"--only: unknown scenario(s) {sorted(unknown)}; expected {SCENARIOS}")
        return 2
    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="zcache-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[faults.ScenarioResult, bool]] = []  # (result, known fault)

    def run(
        name: str, fn: Callable[[pathlib.Path], faults.ScenarioResult], known: bool = False
    ) -> None:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"… {name}", flush=True)
        result = fn(folder)
        result.seconds = time.perf_counter() - t0
        rows.append((result, known))
        print(
            f"  {result.name}: faults {result.faults}, runs {result.runs}, wrong {result.wrong}, "
            f"lost {result.lost}, violations {result.violations} ({result.seconds:.0f} s)",
            flush=True,
        )
        for text in result.notes:
            print(f"    {text}", flush=True)
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
        faults.forget_caches()

    seed = args.seed
    if "crash" in only:
        run("crash", lambda d: faults.run_crash_rounds(d, args.crash_rounds, seed))
    if "crash-points" in only:

        def points(d: pathlib.Path) -> faults.ScenarioResult:
            total = faults.ScenarioResult("SIGKILL at each step of a disk write")
            for i in range(max(1, args.crash_rounds // 20)):
                for point in ("before_replace", "mid_temp_write", "mid_eviction"):
                    total += faults.crash_at(d / f"{point}{i}", point)
            return total

        run("crash-points", points)
    if "corruption" in only:
        run("corruption", lambda d: faults.run_corruption_rounds(d, args.corruption_rounds, seed))
    if "concurrency" in only:

        def stress(d: pathlib.Path) -> faults.ScenarioResult:
            total = faults.ScenarioResult("")
            for i in range(args.stress_runs):
                r = faults.run_stress(
                    d / f"run{i}",
                    args.stress_processes,
                    args.stress_threads,
                    args.stress_ops,
                    seed + i,
                )
                total.name = r.name
                total += r
            return total

        run("concurrency", stress)
    if "stateful" in only:
        run("stateful", lambda d: _stateful(args.stateful_examples, seed))
    if "s3" in only:
        from xarray_zcache.testing.s3server import LocalS3Server

        with LocalS3Server() as server:
            cases = faults.s3_cases_all() + faults.s3_cases_random(args.s3_cases, seed)
            run("s3", lambda d: faults.run_s3_faults(server, cases, d, seed))
    if "disk-full" in only:
        run("disk-full", lambda d: faults.run_disk_full_rounds(d, args.disk_full_rounds, seed))
        run(
            "disk-full-injected",
            lambda d: faults.run_disk_full_rounds(
                d, max(1, args.disk_full_rounds // 4), seed, force_injection=True
            ),
        )
    if args.known_faults:
        run(
            "known-crash-writes",
            lambda d: faults.run_crash_rounds(
                d, max(1, args.crash_rounds // 2), seed, child_writes=True
            ),
            known=True,
        )
        run(
            "known-crash-points",
            lambda d: _sum(
                faults.crash_at(d / p, p)
                for p in (
                    "after_inner_write",
                    "after_inner_delete",
                    "after_inner_write_of_missing_key",
                )
            ),
            known=True,
        )

        def shared(d: pathlib.Path) -> faults.ScenarioResult:
            total = faults.ScenarioResult("")
            for i in range(args.stress_runs):
                r = faults.run_stress(
                    d / f"run{i}",
                    args.stress_processes,
                    args.stress_threads,
                    max(100, args.stress_ops // 3),
                    seed + i,
                    shared_writers=True,
                )
                total.name = r.name
                total += r
            return total

        run("known-shared-writers", shared, known=True)

    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    table = render(rows, args)
    print()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(
            json.dumps([dict(dataclasses.asdict(r), known_fault=k) for r, k in rows], indent=2)
        )
    bad = any(r.wrong or r.lost or r.violations for r, known in rows if not known)
    return 1 if bad else 0


def _sum(results: Any) -> faults.ScenarioResult:
    total = faults.ScenarioResult("")
    for r in results:
        total.name = total.name or r.name
        total += r
    total.name = "SIGKILL between the inner write and the invalidation"
    return total


def render(rows: list[tuple[faults.ScenarioResult, bool]], args: argparse.Namespace) -> str:
    head = (
        "| scenario | faults injected | runs | wrong bytes returned | data lost "
        "| errors to the user | broken invariants | time |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )

    def line(r: faults.ScenarioResult) -> str:
        return (
            f"| {r.name} | {r.faults:,} | {r.runs:,} | **{r.wrong}** | **{r.lost}** "
            f"| {r.errors_to_user:,} | {r.violations} | {r.seconds:.0f} s |"
        )

    out = [head] + [line(r) for r, known in rows if not known]
    known = [line(r) for r, k in rows if k]
    if known:
        out += [
            "",
            "Scenarios of the faults fixed last (see *Faults found and fixed*):",
            "",
            head,
            *known,
        ]
    cpu = os.cpu_count()
    out += [
        "",
        f"`python benchmarks/stress.py --seed {args.seed} --crash-rounds {args.crash_rounds} "
        f"--corruption-rounds {args.corruption_rounds} --stress-ops {args.stress_ops} "
        f"--stress-runs {args.stress_runs} --stateful-examples {args.stateful_examples} "
        f"--s3-cases {args.s3_cases} --disk-full-rounds {args.disk_full_rounds}"
        f"{' --known-faults' if args.known_faults else ''}` on "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{cpu} CPUs, {time.strftime('%Y-%m-%d')}.",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
