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
        return "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2)) for a, w in zip(align, widths)
    ) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def sec(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.0f} ms"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


# -- main table ---------------------------------------------------------------------------------


def main_table(res: dict[str, Any]) -> str:
    rows = []
    for key, r in res["readers"].items():
        if "error" in r:
            rows.append([r["label"], "error: " + r["error"][:60], "", "", "", "", "", ""])
            continue
        restart = r.get("restart")
        rs = "–"
        rreq = "–"
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
                f"{ro['requests']} ({ro['after_first']} after 1st)",
                f"{ro['seconds_median'] * 1000:.0f} ms",
            ]
        )
    return table(
        [
            "reader",
            "full read cold",
            "warm",
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
    return table(["policy (same trace, same capacity)", "hit rate"], rows)


def sharded_table(sh: dict[str, Any]) -> str:
    rows = []
    for label, w in sh["rows"].items():
        cells = [label]
        for workload in ("full", "point"):
            c, wm = w[workload]["cold"], w[workload]["warm"]
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
                f"{mh['ratio']:.2f}×",
            ]
        )
        rows.append(
            [
                "memory hit, sync path: get_sync vs MemoryStore.get_sync",
                f"{mh['zcache_get_sync_us']:.1f} µs",
                f"{mh['memorystore_get_sync_us']:.1f} µs",
                f"{mh['ratio_sync']:.2f}×",
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
                    f"{ix['ratio_' + stat]:.2f}×",
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
        add(
            f"cold full read requests ({tag})",
            f"{cold['total']} requests, {cold['head']} HEAD, for {n} chunks",
            f"≤ {n}, no HEAD",
            cold["total"] <= n and cold["head"] == 0,
        )
        if best_uncached:
            r = cold["seconds"] / best_uncached
            add(
                f"cold full read wall vs best uncached ({tag})",
                f"{sec(cold['seconds'])} vs {sec(best_uncached)} = {r:.2f}×",
                "≤ 1.05×",
                r <= 1.05,
                r,
            )
            add(
                f"cold scan speed-up vs no cache, stretch ({tag})",
                f"{1 / r:.2f}× faster",
                "≥ 2×",
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
                    f"{sec(w)} vs {sec(ms)} = {w / ms:.2f}×",
                    "≤ 1.15×",
                    w / ms <= 1.15,
                    w / ms,
                )
    if ok("zcache_disk") and ok("localstore"):
        a, b = R["zcache_disk"].get("restart"), R["localstore"].get("restart")
        if a and b:
            r = a["seconds"] / b["seconds"]
            add(
                "full read from disk in a fresh process vs LocalStore",
                f"{sec(a['seconds'])} vs {sec(b['seconds'])} = {r:.2f}× "
                f"({a['read']['chunk_get']} chunk GETs)",
                "≤ 1.5×",
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
        for pol in ("slru", "lru"):
            h = p[f"xarray-zcache {pol}"]
            add(
                f"Zipf hit rate ≥ plain LRU ({pol})",
                f"{pct(h)} vs {pct(lru)}",
                "≥ LRU",
                h >= lru - 1e-9,
            )
            add(
                f"Zipf hit rate within 5 points of Belady ({pol})",
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
            f"{mh['ratio']:.2f}×",
            "≤ 2×",
            mh["ratio"] <= 2,
            mh["ratio"],
        )
    ix = m.get("index")
    if ix:
        add(
            f"disk hit latency, {ix['large']['entries']:,} vs {ix['small']['entries']:,} entries",
            f"median {ix['ratio_median']:.2f}×, mean {ix['ratio_mean']:.2f}×",
            "≤ 1.5×",
            max(ix["ratio_median"], ix["ratio_mean"]) <= 1.5,
            ix["ratio_mean"],
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

    R = {k: v for k, v in res["readers"].items() if "error" not in v}
    labels = [v["label"].replace(" (upper bound)", "\n(upper bound)") for v in R.values()]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    s = res["settings"]
    fig.suptitle(
        f"xarray-zcache benchmarks: {s['nt']}×{s['ny']}×{s['nx']} float32, {s['n_chunks']} "
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
    ax.set_xscale("log")
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
    ax.set_xscale("log")
    ax.set_xlabel("S3 requests (log; 0 drawn as 0.5)")
    ax.set_title("requests reaching S3 (counted by the server)")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    z = res.get("zipf")
    if z:
        names = list(z["policies"])
        vals = [100 * z["policies"][n] for n in names]
        colors = ["#1f77b4" if n.startswith("xarray") else "#7f7f7f" for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
        ax.set_ylabel("hit rate (%)")
        ax.set_title(
            f"Zipf(α={z['alpha']}) chunk reads, {z['accesses']} accesses, cache = "
            f"{100 * z['capacity_fraction']:.0f} % of the working set"
        )

    ax = axes[1, 1]
    ts = [t for t in res.get("targets", []) if t.get("ratio") is not None]
    limits = {"≤ 1.05×": 1.05, "≤ 1.15×": 1.15, "≤ 1.5×": 1.5, "≤ 2×": 2.0}
    ts = [t for t in ts if t["goal"] in limits]
    if ts:
        vals = [t["ratio"] / limits[t["goal"]] for t in ts]
        colors = ["#2ca02c" if t["met"] else "#d62728" for t in ts]
        yy = np.arange(len(ts))
        ax.barh(yy, vals, color=colors)
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(yy, [f"{t['target']}\n(goal {t['goal']})" for t in ts], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, t in enumerate(ts):
            ax.text(vals[i], i, f" {t['ratio']:.2f}×", va="center", fontsize=8)
        ax.set_xlabel("measured ratio / target ratio (log; ≤ 1 = met)")
        ax.set_title("ratio targets (green: met, red: not met)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
