"""Turn the results dict into tables (markdown pipe tables, aligned), target verdicts, a plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or ("<" + ">" * (len(header) - 1))

    def line(r: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths, strict=True))
            + " |"
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2))
            for a, w in zip(align, widths, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def sec(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.0f} ms"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


# -- main table ---------------------------------------------------------------------------------


def main_table(res: dict[str, Any]) -> str:
    rows = []
    for r in res["readers"].values():
        if "error" in r:
            rows.append([r["label"], "error: " + r["error"][:60], "", "", "", "", "", ""])
            continue
        restart = r.get("restart")
        rs = "-"
        rreq = "-"
        if restart:
            rs = sec(restart["seconds"]) + ("" if restart["correct"] else " WRONG")
            rreq = f"{restart['read']['total']} (+{restart['open']['total']} open)"
        cold, warm = r["cold"], r["warm"]
        ok = "" if (cold["correct"] and warm["correct"]) else " WRONG"
        heads = cold["head"] + warm["head"]
        req = f"{cold['total']} / {warm['total']}" + (f" ({heads} HEAD)" if heads else "")
        ro = r["reopen"]
        rows.append(
            [
                r["label"],
                sec(cold["seconds"]) + ok,
                sec(warm["seconds"]),
                rs,
                req,
                rreq,
                f"{ro['requests']} ({ro['after_first']} after 1st)" if ro else "not measured",
                f"{ro['seconds_median'] * 1000:.0f} ms" if ro else "-",
            ]
        )
    return table(
        [
            "reader",
            "full read cold",
            "warm (median)",
            "after restart",
            "S3 requests cold / warm",
            "restart requests",
            f"{res['settings']['reopens']} re-opens: requests",
            "re-open time",
        ],
        rows,
    )


def zipf_table(z: dict[str, Any]) -> str:
    rows = [[name, pct(rate)] for name, rate in z["policies"].items()]
    return table(["policy (same trace, same capacity)", "hit rate (1 - S3 GETs / reads)"], rows)


def sharded_table(sh: dict[str, Any]) -> str:
    rows = []
    for label, w in sh["rows"].items():
        cells = [label]
        for workload in ("full", "point"):
            if "error" in w[workload]:
                cells += ["fails: " + w[workload]["error"][:40], "-"]
                continue
            c, wm = w[workload]["cold"], w[workload].get("warm")
            if wm is None:  # no cache: warm = cold
                cells += [
                    f"{sec(c['seconds'])} (= warm)" + ("" if c["correct"] else " WRONG"),
                    f"{c['total']} / {c['total']}",
                ]
                continue
            bad = "" if c["correct"] and wm["correct"] else " WRONG"
            cells += [
                f"{sec(c['seconds'])} / {sec(wm['seconds'])}{bad}",
                f"{c['total']} / {wm['total']}",
            ]
        rows.append(cells)
    return table(
        [
            "reader (sharded copy)",
            "full read cold / warm",
            "requests cold / warm",
            "point series cold / warm",
            "requests cold / warm",
        ],
        rows,
    )


def cluster_table(cl: dict[str, Any]) -> str:
    rows = []
    for p in cl["passes"]:
        ws = p["workers"].values()
        rows.append(
            [
                f"pass {p['pass']}" + ("" if p["correct"] else " WRONG"),
                sec(p["seconds"]),
                p["chunk_get"],
                p["total"],
                sum(w.get("memory_hits", 0) for w in ws),
                sum(w.get("disk_hits", 0) for w in ws),
                sum(w.get("misses", 0) for w in ws),
            ]
        )
    return table(
        [
            f"{cl['workers']}-worker LocalCluster",
            "time",
            "chunk GETs",
            "all requests",
            "memory hits (cum.)",
            "disk hits (cum.)",
            "misses (cum.)",
        ],
        rows,
    )


def micro_table(m: dict[str, Any]) -> str:
    rows = []
    mh = m.get("memory_hit")
    if mh:
        rows.append(
            [
                f"memory hit, {mh['value_bytes'] >> 20} MiB value: CachedStore.get vs "
                "MemoryStore.get (async)",
                f"{mh['zcache_get_us']:.1f} µs",
                f"{mh['memorystore_get_us']:.1f} µs",
                f"{mh['ratio']:.2f}x",
            ]
        )
        rows.append(
            [
                "memory hit, sync path: get_sync vs MemoryStore.get_sync",
                f"{mh['zcache_get_sync_us']:.1f} µs",
                f"{mh['memorystore_get_sync_us']:.1f} µs",
                f"{mh['ratio_sync']:.2f}x",
            ]
        )
    ix = m.get("index")
    if ix:
        for stat in ("median", "mean"):
            rows.append(
                [
                    f"disk hit (64 KiB), {stat}: {ix['large']['entries']:,} vs "
                    f"{ix['small']['entries']:,} index entries",
                    f"{ix['large'][stat + '_us']:.1f} µs",
                    f"{ix['small'][stat + '_us']:.1f} µs",
                    f"{ix['ratio_' + stat]:.2f}x",
                ]
            )
        rows.append(
            [
                "disk hit p99: large vs small index",
                f"{ix['large']['p99_us']:.0f} µs",
                f"{ix['small']['p99_us']:.0f} µs",
                "",
            ]
        )
    bk = m.get("bookkeeping")
    if bk:
        rows.append(
            [
                "bookkeeping per memory entry (pympler): tier / whole cache / declared",
                f"{bk['memory_tier']:.0f} / {bk['whole_cache']:.0f} / "
                f"{bk['declared_entry_overhead']} B",
                "",
                "",
            ]
        )
        if "trace_per_access" in bk:
            cap = bk.get("trace_capacity")
            rows.append(
                [
                    "access trace (analytics), per recorded read"
                    + (f"; full ({cap:,} reads)" if cap else ""),
                    f"{bk['trace_per_access']:.0f} B"
                    + (f"; {bk['trace_bytes_at_capacity'] / 2**20:.1f} MiB" if cap else ""),
                    "",
                    "",
                ]
            )
    return table(["micro-benchmark", "xarray-zcache", "reference", "ratio"], rows)


# -- targets ------------------------------------------------------------------------------------


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per target: name, measured (text), target (text), value, limit, met."""
    out: list[dict[str, Any]] = []
    R = res.get("readers", {})

    def add(name: str, measured: str, target: str, met: bool | None, ratio: float | None = None):
        out.append(
            {"target": name, "measured": measured, "goal": target, "met": met, "ratio": ratio}
        )

    def ok(key: str) -> bool:
        return key in R and "error" not in R[key]

    n = res["settings"]["n_chunks"]
    uncached = [R[k]["cold"]["seconds"] for k in ("nocache_default", "nocache_mc1") if ok(k)]
    best_uncached = min(uncached) if uncached else None
    for key, tag in (("zcache_disk", "memory+disk"), ("zcache_mem", "memory only")):
        if not ok(key):
            continue
        cold = R[key]["cold"]
        others = cold.get("other_requests") or []
        add(
            f"cold full read requests ({tag})",
            f"{cold['total']} requests ({cold['chunk_get']} chunk GETs"
            + (f" + {', '.join(others[:3])}" if others else "")
            + f"), {cold['head']} HEAD, for {n} chunks",
            f"≤ {n}, no HEAD",
            cold["total"] <= n and cold["head"] == 0,
        )
        if best_uncached:
            r = cold["seconds"] / best_uncached
            add(
                f"cold full read wall vs best uncached ({tag})",
                f"{sec(cold['seconds'])} vs {sec(best_uncached)} = {r:.2f}x",
                "≤ 1.05x",
                r <= 1.05,
                r,
            )
            add(
                f"cold scan speed-up vs no cache, stretch ({tag})",
                f"{1 / r:.2f}x faster",
                "≥ 2x",
                1 / r >= 2,
                1 / r,
            )
    if ok("memorystore"):
        ms = R["memorystore"]["warm"]["seconds"]
        for key, tag in (("zcache_mem", "memory only"), ("zcache_disk", "memory+disk")):
            if ok(key):
                w = R[key]["warm"]["seconds"]
                add(
                    f"warm full read vs MemoryStore ({tag})",
                    f"{sec(w)} vs {sec(ms)} = {w / ms:.2f}x",
                    "≤ 1.15x",
                    w / ms <= 1.15,
                    w / ms,
                )
    if ok("zcache_disk") and ok("localstore"):
        a, b = R["zcache_disk"].get("restart"), R["localstore"].get("restart")
        if a and b:
            r = a["seconds"] / b["seconds"]
            add(
                "full read from disk in a fresh process vs LocalStore",
                f"{sec(a['seconds'])} vs {sec(b['seconds'])} = {r:.2f}x "
                f"({a['read']['chunk_get']} chunk GETs)",
                "≤ 1.5x",
                r <= 1.5 and a["read"]["chunk_get"] == 0,
                r,
            )
    for key, tag in (("zcache_mem", "memory only"), ("zcache_disk", "memory+disk")):
        if ok(key):
            ro = R[key]["reopen"]
            add(
                f"re-opens after the first: requests ({tag})",
                f"{ro['after_first']} (first re-open: {ro['per_open'][0]})",
                "0",
                ro["after_first"] == 0,
            )
    z = res.get("zipf")
    if z:
        p = z["policies"]
        lru, opt = p["lru (simulated)"], p["belady (optimal, simulated)"]
        for name, h in p.items():
            if not name.startswith("xarray-zcache"):
                continue
            tag = name.removeprefix("xarray-zcache ")
            if "prefetch" not in tag:
                tag += ", prefetch off"
            elif "default config" not in tag:
                continue  # policy + read-ahead: in the Zipf table only
            add(
                f"Zipf hit rate ≥ plain LRU ({tag})",
                f"{pct(h)} vs {pct(lru)}",
                "≥ LRU",
                h >= lru - 1e-9,
            )
            add(
                f"Zipf hit rate within 5 points of Belady ({tag})",
                f"{pct(h)} vs {pct(opt)} ({100 * (opt - h):.1f} points)",
                "≤ 5 points",
                opt - h <= 0.05,
            )
    m = res.get("micro", {})
    mh = m.get("memory_hit")
    if mh:
        add(
            "store-level memory hit get vs MemoryStore.get (1 MiB)",
            f"{mh['zcache_get_us']:.1f} µs vs {mh['memorystore_get_us']:.1f} µs = "
            f"{mh['ratio']:.2f}x",
            "≤ 2x",
            mh["ratio"] <= 2,
            mh["ratio"],
        )
    ix = m.get("index")
    if ix:
        key = "mean_us_without_slowest_1pct"
        trimmed = ix["large"][key] / ix["small"][key] if key in ix["large"] else ix["ratio_mean"]
        add(
            f"disk hit latency, {ix['large']['entries']:,} vs {ix['small']['entries']:,} entries",
            f"median {ix['ratio_median']:.2f}x, mean without the slowest 1 % {trimmed:.2f}x "
            f"(plain mean {ix['ratio_mean']:.2f}x)",
            "≤ 1.5x",
            max(ix["ratio_median"], trimmed) <= 1.5,
            max(ix["ratio_median"], trimmed),
        )
    bk = m.get("bookkeeping")
    if bk:
        worst = max(bk["memory_tier"], bk["whole_cache"])
        add(
            "bookkeeping per memory entry (pympler)",
            f"{worst:.0f} B (tier {bk['memory_tier']:.0f} B, declared "
            f"{bk['declared_entry_overhead']} B)",
            "≤ 300 B",
            worst <= 300,
        )
    cl = res.get("cluster")
    if cl and "passes" in cl:
        p2 = cl["passes"][1]
        add("cluster: second pass chunk requests", str(p2["chunk_get"]), "0", p2["chunk_get"] == 0)
        cw = cl["cross_worker"]
        add(
            "cluster: chunk fetched by worker A is a disk hit on worker B",
            f"B: {cw['b']['disk_hits']} disk hit, {cw['b']['chunk_gets']} S3 GET",
            "disk hit, 0 GET",
            cw["ok"],
        )
    return out


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [
        [t["target"], t["measured"], t["goal"], "met" if t["met"] else "NOT met"] for t in targets
    ]
    return table(["target", "measured", "target value", "verdict"], rows, align="<<<<")


# -- plot ---------------------------------------------------------------------------------------


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain_log(ax: Any) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())

    R = {k: v for k, v in res["readers"].items() if "error" not in v and v.get("reopen")}
    labels = [v["label"].replace(" (upper bound)", "\n(upper bound)") for v in R.values()]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    s = res["settings"]
    fig.suptitle(
        f"xarray-zcache benchmarks: {s['nt']}x{s['ny']}x{s['nx']} float32, {s['n_chunks']} "
        f"chunks, {s['latency'] * 1000:g} ms S3 latency, {s['threads']} threads "
        f"({res['machine'].get('nproc', '?')} cores)"
    )
    y = np.arange(len(R))
    ax = axes[0, 0]
    h = 0.27
    for i, (phase, color) in enumerate(
        (("cold", "#d62728"), ("warm", "#2ca02c"), ("restart", "#1f77b4"))
    ):
        vals = []
        for v in R.values():
            x = v.get(phase)
            vals.append(x["seconds"] if x else np.nan)
        ax.barh(y + (i - 1) * h, vals, height=h, color=color, label=f"full read {phase}")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    plain_log(ax)
    ax.set_xlabel("seconds (log)")
    ax.set_title("full read of the dataset")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for i, (name, getter, color) in enumerate(
        (
            ("cold read", lambda v: v["cold"]["total"], "#d62728"),
            ("warm read", lambda v: v["warm"]["total"], "#2ca02c"),
            (f"{s['reopens']} re-opens", lambda v: v["reopen"]["requests"], "#9467bd"),
        )
    ):
        vals = [getter(v) for v in R.values()]
        ax.barh(y + (i - 1) * h, [max(x, 0.5) for x in vals], height=h, color=color, label=name)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    plain_log(ax)
    ax.set_xlabel("S3 requests (log; 0 drawn as 0.5)")
    ax.set_title("requests reaching S3 (counted by the server)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    z = res.get("zipf")
    if z:
        names = list(z["policies"])
        vals = [100 * z["policies"][n] for n in names]
        colors = ["#1f77b4" if n.startswith("xarray") else "#7f7f7f" for n in names]
        yy = np.arange(len(names))
        ax.barh(yy, vals, color=colors)
        ax.set_yticks(yy, [n.replace(" (", "\n(", 1) for n in names], fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("hit rate (%); grey: offline references and zarr CacheStore")
        ax.set_title(
            f"Zipf(alpha={z['alpha']}) chunk reads, {z['accesses']} accesses, cache = "
            f"{100 * z['capacity_fraction']:.0f} % of the working set"
        )

    ax = axes[1, 1]
    ts = [t for t in res.get("targets", []) if t.get("ratio") is not None]
    limits = {"≤ 1.05x": 1.05, "≤ 1.15x": 1.15, "≤ 1.5x": 1.5, "≤ 2x": 2.0}
    ts = [t for t in ts if t["goal"] in limits]
    if ts:
        vals = [t["ratio"] / limits[t["goal"]] for t in ts]
        colors = ["#2ca02c" if t["met"] else "#d62728" for t in ts]
        yy = np.arange(len(ts))
        ax.barh(yy, vals, color=colors)
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(yy, [f"{t['target']}\n(goal {t['goal']})" for t in ts], fontsize=7)
        ax.invert_yaxis()
        plain_log(ax)
        for i, t in enumerate(ts):
            ax.text(vals[i], i, f" {t['ratio']:.2f}x", va="center", fontsize=8)
        ax.set_xlabel("measured ratio / target ratio (log; ≤ 1 = met)")
        ax.set_title("ratio targets (green: met, red: not met)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lib_files(git: dict[str, Any]) -> list[str]:
    return [f for f in git.get("dirty", []) if f.startswith("xarray_zcache/")]


def render(res: dict[str, Any]) -> str:
    """The whole report (markdown), from the results dict."""
    st = res["settings"]
    chunks = (st["chunk_t"], st["chunk_y"], st["chunk_x"])
    m = res["machine"]
    v = m["versions"]
    parts = [
        f"## xarray-zcache benchmarks ({res['started']}, {res['seconds']:.0f} s)",
        "",
        f"Machine: {m.get('nproc')} cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB; "
        f"Python {m['python']}, zarr {v['zarr']}, xarray {v['xarray']}, dask {v['dask']}, "
        f"s3fs {v['s3fs']}.",
        f"Data: {st['nt']}x{st['ny']}x{st['nx']} float32, chunks {chunks} = "
        f"{st['n_chunks']} chunks, "
        f"{res.get('dataset', {}).get('stored_bytes', 0) / 2**20:.1f} MiB stored (zstd); "
        f"{st['latency'] * 1000:g} ms per S3 request; {st['threads']} Dask threads.",
    ]
    sv = res.get("server", {})
    if "sequential_ms" in sv:
        parts.append(
            f"Local S3 (moto, own process) without injected latency: "
            f"{sv['sequential_ms']:.1f} ms per sequential GET, "
            f"{sv['concurrent16_per_s']:.0f} GET/s with 16 in flight."
        )
    g = res.get("git", {})
    if g:
        parts.append(
            f"Code: commit {g.get('commit')}"
            + (f" + uncommitted changes in {', '.join(lib)}" if (lib := lib_files(g)) else "")
            + "."
        )
    if res["readers"]:
        parts += ["", "### Full reads and re-opens", "", main_table(res)]
        notes = []
        for r in res["readers"].values():
            w = r.get("warm", {})
            several = "first_seconds" in w and len(w.get("runs") or ()) > 1
            if several and w["first_seconds"] > 1.5 * w["seconds"]:
                notes.append(f"{r['label']} {sec(w['first_seconds'])}")
        parts += [
            "",
            f"Cold: median of {st.get('cold_runs', 1)} reads for xarray-zcache (each on a fresh "
            "cache) and for the uncached rows (the warm read included), one read otherwise. "
            f"Warm: median of {st['warm_rounds']} reads taken in rotation over the caching readers "
            f"(after the re-opens). Restart: median of {st['restart_runs']} fresh processes.",
        ]
        if notes:
            parts.append(
                "First warm read right after the cold read, when well above the median: "
                + "; ".join(notes)
                + "."
            )
    pf = res.get("prefetch")
    if pf:
        best = min(
            (r["cold"]["seconds"] for k, r in res["readers"].items() if k.startswith("nocache")),
            default=None,
        )
        rows = [
            [
                f"{r['depth']}" + (" (default)" if r["depth"] == pf["default"] else ""),
                sec(r["seconds"]),
                f"{best / r['seconds']:.2f}x" if best else "-",
                r["total"],
            ]
            for r in pf["rows"]
        ]
        parts += [
            "",
            "### Cold full read vs read-ahead depth (xarray-zcache, memory only)",
            "",
            table(
                ["prefetch_depth", "cold full read", "speed-up vs best uncached", "requests"], rows
            ),
        ]
    if "zipf" in res:
        z = res["zipf"]
        parts += [
            "",
            f"### Zipf-skewed chunk reads (alpha={z['alpha']}, {z['accesses']} reads of "
            f"{z['distinct_chunks']} distinct chunks, capacity {z['capacity_bytes'] / 2**20:.1f}"
            f" MiB = {100 * z['capacity_fraction']:.0f} % of the working set)",
            "",
            zipf_table(z),
        ]
    if "sharded" in res:
        sh = res["sharded"]
        parts += [
            "",
            f"### Sharded copy (shards {tuple(sh['shards'])}, inner chunks "
            f"{tuple(sh['inner_chunks'])})",
            "",
            sharded_table(sh),
        ]
    if "cluster" in res:
        cl = res["cluster"]
        cw = cl["cross_worker"]
        parts += [
            "",
            f"### Dask LocalCluster ({cl['workers']} worker processes x "
            f"{cl['threads_per_worker']} threads, shared disk tier)",
            "",
            cluster_table(cl),
            "",
            f"Cross-worker: worker A read a fresh chunk ({cw['a']['chunk_gets']} S3 GET, "
            f"{cw['a']['misses']} miss); worker B then read it: {cw['b']['chunk_gets']} S3 GET, "
            f"{cw['b']['disk_hits']} disk hit, {cw['b']['misses']} miss.",
        ]
    if res.get("micro"):
        parts += ["", "### Micro-benchmarks", "", micro_table(res["micro"])]
    parts += ["", "### Targets (issue 5)", "", targets_table(res["targets"])]
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    if errors:
        parts += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    return "\n".join(parts)
