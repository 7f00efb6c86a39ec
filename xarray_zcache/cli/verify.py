"""``zcache verify``: the tier's own check (``DiskTier.verify``), and with ``--repair`` its
repair, including the rebuild of a lost or damaged index from the payload files."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Final

from xarray_zcache.cli.errors import EXIT_FAILURE, CliError
from xarray_zcache.cli.folders import configured_folder, folder, open_tier
from xarray_zcache.cli.output import emit, emit_json, plural

__all__ = ["run"]

DAMAGE: Final = ("corrupt", "missing_files", "orphan_files", "mismatched", "index_damaged")
LABELS: Final = {
    "ok": "entries whose payload file and index row agree",
    "corrupt": "damaged payload files (bad header, length or checksum)",
    "missing_files": "index rows without a payload file",
    "orphan_files": "payload files without an index row",
    "mismatched": "payload file and index row disagree (size or checksum)",
    "temp_files": "temp files of unfinished writes (in flight, or left by a crash)",
    "unknown_files": "files the cache does not know (never touched)",
    "index_damaged": "index.db failed SQLite's integrity check",
}


def damage(counts: Mapping[str, int]) -> int:
    return sum(counts.get(k, 0) for k in DAMAGE)


def _counts(counts: Mapping[str, int]) -> list[str]:
    keys = [k for k in LABELS if k in counts] + [k for k in counts if k not in LABELS]
    width = max(len(k) for k in keys)
    nw = max(len(str(counts[k])) for k in keys)
    return [f"  {k:<{width}}  {counts[k]:>{nw}}  {LABELS.get(k, '')}" for k in keys]


def _rebuilt(rebuilt: Mapping[str, int]) -> str:
    if not rebuilt:
        return "a new, empty index was created"
    extra = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in rebuilt.items() if k != "indexed")
    text = f"rebuilt from the payload files' headers: {rebuilt.get('indexed', 0)} entries"
    return f"{text} ({extra})" if extra else text


def run(args: argparse.Namespace) -> int:
    raw = configured_folder(args.path)
    path, state = folder(raw)
    index = "ok"
    if not state.ok:
        if not state.recoverable:
            raise CliError(
                f"{raw}: is not an xarray-zcache disk cache folder ({state.detail}); "
                "nothing was changed"
            )
        if not args.repair:  # opening the tier would rebuild the index: report only
            if args.json:
                emit_json(
                    {
                        "path": str(path),
                        "index": f"{state.state}: {state.detail}",
                        "damage": 1,
                        "repaired": False,
                        "consistent": False,
                    }
                )
            else:
                emit(f"Disk cache {path}: the index is {state.state}: {state.detail}")
                emit(f"Damage found. Run 'zcache verify {raw} --repair' to rebuild it.")
            return EXIT_FAILURE
        index = f"{state.state}: {state.detail}"
    with open_tier(path, rebuild=not state.ok) as tier:
        rebuilt = dict(tier.last_rebuild)
        found = tier.verify(repair=args.repair)
        after = tier.verify(repair=False) if args.repair else None
    problems = damage(found) + (0 if state.ok else 1)
    consistent = damage(after if after is not None else found) == 0
    if args.json:
        report: dict[str, Any] = {
            "path": str(path),
            "index": index,
            "rebuilt": None if state.ok else rebuilt,
            "found": found,
            "damage": problems,
            "repaired": bool(args.repair),
            "after": after,
            "consistent": consistent,
        }
        emit_json(report)
        return 0 if consistent else EXIT_FAILURE
    files = sum(v for k, v in found.items() if k not in ("missing_files", "index_damaged"))
    emit(f"Disk cache {path}: checked {plural(files, 'file')}")
    if not state.ok:
        emit(f"  index.db was {index}; {_rebuilt(rebuilt)}")
    for line in _counts(found):
        emit(line)
    if not problems:
        emit("Consistent: no damage found.")
    elif after is not None and consistent:
        emit(
            f"Repaired {plural(problems, 'problem')}; now consistent "
            f"({after.get('ok', 0)} entries ok)."
        )
    elif after is not None:
        emit(f"Repair incomplete: {plural(damage(after), 'problem')} remain:")
        for line in _counts(after):
            emit(line)
    else:
        emit(
            f"Damage found: {plural(problems, 'problem')}. "
            f"Run 'zcache verify {raw} --repair' to fix it."
        )
    return 0 if consistent else EXIT_FAILURE
