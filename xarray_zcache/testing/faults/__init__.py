"""Fault injection for the reliability suite (issue 6), shared with ``benchmarks/stress.py``.

For tests and benchmarks only: nothing else in ``xarray_zcache`` imports this package.

* :mod:`.values`: self-describing values (:func:`make_value`, :func:`check_value`,
  :func:`check_slice`): a read can tell a right value from a torn one, another key's, or
  garbage, whole or sliced.
* :mod:`.damage`: bit flips, truncations and overwrites of payload files, ``index.db`` and its
  WAL.
* :mod:`.tmpfs`: a full disk, a size-limited tmpfs (root only) or injected ENOSPC.
* :mod:`.proxy`: :class:`FaultProxy`, an HTTP proxy on 127.0.0.1 in front of the local S3
  server injecting HTTP 500, 503 SlowDown, resets, stalls and truncated bodies.
* :mod:`.report`: :class:`ScenarioResult`, the outcome of a scenario.
* :mod:`.stores`: shared pieces (cached stores over local data, :func:`compare_all`,
  :func:`verify_folder`).
* Scenarios, each running one kind of fault N times and returning a :class:`ScenarioResult`
  (faults injected, runs, wrong bytes returned, data lost): :mod:`.crash` (SIGKILL, at random
  or at the disk tier's named hooks), :mod:`.corruption`, :mod:`.concurrency`, :mod:`.s3`,
  :mod:`.diskfull`. The tests run them briefly and assert that nothing wrong or lost was
  seen; ``benchmarks/stress.py`` runs them longer and writes the table of
  ``docs/reliability.md``.
"""

from xarray_zcache.testing.faults.concurrency import (
    STRESS_DISK,
    STRESS_KEYS,
    STRESS_MEMORY,
    run_stress,
)
from xarray_zcache.testing.faults.corruption import run_corruption_rounds
from xarray_zcache.testing.faults.crash import (
    CRASH_DISK,
    CRASH_MEMORY,
    CRASH_POINTS,
    DISK_CRASH_POINTS,
    crash_at,
    run_crash_rounds,
)
from xarray_zcache.testing.faults.damage import (
    DAMAGE_KINDS,
    HEADER_PAD,
    Span,
    damage,
    entry_spans,
    flip_bit,
    overwrite,
    payload_files,
    temp_files,
    truncate_file,
)
from xarray_zcache.testing.faults.diskfull import run_disk_full_rounds
from xarray_zcache.testing.faults.proxy import FAULT_KINDS, Fault, FaultKind, FaultProxy
from xarray_zcache.testing.faults.report import ScenarioResult, WarningCapture, timed
from xarray_zcache.testing.faults.s3 import (
    S3Case,
    cached_entries,
    few_s3fs_retries,
    run_s3_faults,
    s3_cases_all,
    s3_cases_random,
    s3_client_options,
)
from xarray_zcache.testing.faults.stores import (
    cached,
    compare_all,
    config,
    dataset_keys,
    forget_caches,
    local_store,
    unique,
    verify_folder,
)
from xarray_zcache.testing.faults.tmpfs import enospc_injected, fill_disk, small_tmpfs
from xarray_zcache.testing.faults.values import (
    UNIT,
    buf,
    check_slice,
    check_value,
    key_tag,
    make_value,
    parse_unit,
    stress_value,
)

__all__ = [
    "CRASH_DISK",
    "CRASH_MEMORY",
    "CRASH_POINTS",
    "DAMAGE_KINDS",
    "DISK_CRASH_POINTS",
    "FAULT_KINDS",
    "HEADER_PAD",
    "STRESS_DISK",
    "STRESS_KEYS",
    "STRESS_MEMORY",
    "UNIT",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "S3Case",
    "ScenarioResult",
    "Span",
    "WarningCapture",
    "buf",
    "cached",
    "cached_entries",
    "check_slice",
    "check_value",
    "compare_all",
    "config",
    "crash_at",
    "damage",
    "dataset_keys",
    "enospc_injected",
    "entry_spans",
    "few_s3fs_retries",
    "fill_disk",
    "flip_bit",
    "forget_caches",
    "key_tag",
    "local_store",
    "make_value",
    "overwrite",
    "parse_unit",
    "payload_files",
    "run_corruption_rounds",
    "run_crash_rounds",
    "run_disk_full_rounds",
    "run_s3_faults",
    "run_stress",
    "s3_cases_all",
    "s3_cases_random",
    "s3_client_options",
    "small_tmpfs",
    "stress_value",
    "temp_files",
    "timed",
    "truncate_file",
    "unique",
    "verify_folder",
]
