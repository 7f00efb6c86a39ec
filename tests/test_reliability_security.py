"""Issue 6, part 6: security.

Hostile keys never create files outside the cache folder; the folder is created 0700 and
every file in it 0600; a folder owned by another user is refused with a clear error;
credentials from ``storage_options`` never appear in ``index.db``, payload files, stats, logs,
reprs or the cluster stats; nothing read from disk is ever unpickled.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib
import re
import stat
from typing import Any

import numpy as np
import pytest
import xarray as xr
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

import xarray_zcache
from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.testing import faults
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

P = default_buffer_prototype()
PAYLOAD_NAME = re.compile(r"^[0-9a-f]{64}\.(cache|meta)$")
SEGMENT_NAME = re.compile(r"^\d+-[0-9a-f]{16}\.seg$")
ROOT_FILES = {
    "index.db",
    "index.db-wal",
    "index.db-shm",
    "index.db.lock",
    # the location map's hint file (cache/disk/hint.py): key hashes, never keys
    "index.keydir",
    "settings.json",
    # the version book of validation (cache/versions.py)
    "versions.db",
    "versions.db-wal",
    "versions.db-shm",
}

HOSTILE_KEYS = [
    "../../etc/passwd",
    "../../../../../../../../tmp/zcache-escape",
    "/etc/passwd",
    "/tmp/zcache-escape-abs",
    "a/../../../b",
    "..",
    ".",
    "",
    "a\x00b",
    "\x00",
    "k" * 10_000,
    "é/漢字/🦆/zarr.json",
    "a\\..\\..\\windows",
    "c/\n\r\t",
    "%2e%2e%2f%2e%2e%2fetc",
]


def _tree(root: pathlib.Path) -> set[pathlib.Path]:
    return {p for p in root.rglob("*")}


def _check_folder(cache_dir: pathlib.Path) -> None:
    """Only the expected names, in the expected places, with the expected modes."""
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    for path in cache_dir.rglob("*"):
        rel = path.relative_to(cache_dir)
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not path.is_symlink(), rel
        if path.is_dir():
            assert mode == 0o700, (rel, oct(mode))
            if rel == pathlib.Path("segments"):
                continue
            assert len(rel.parts) <= 2 and rel.parts[0] in ("chunks", "metadata"), rel
            continue
        assert mode == 0o600, (rel, oct(mode))
        if len(rel.parts) == 1:
            assert rel.name in ROOT_FILES, rel
        elif rel.parts[0] == "segments":  # records: named by process and random, not by key
            assert len(rel.parts) == 2 and SEGMENT_NAME.match(rel.name), rel
        else:
            assert len(rel.parts) == 3 and rel.parts[0] in ("chunks", "metadata"), rel
            assert PAYLOAD_NAME.match(rel.name), rel


@pytest.mark.parametrize(
    ("umask", "pack_below"),
    [(0o022, "64KiB"), (0o000, "64KiB"), (0o000, 0)],
    ids=["022-records", "000-records", "000-files"],
)
def test_hostile_keys_never_leave_the_cache_folder(
    tmp_path: pathlib.Path, umask: int, pack_below: int | str
) -> None:
    old_umask = os.umask(umask)
    try:
        escape = [pathlib.Path("/tmp/zcache-escape"), pathlib.Path("/tmp/zcache-escape-abs")]
        passwd = pathlib.Path("/etc/passwd")
        passwd_before = passwd.stat() if passwd.exists() else None
        cache_dir = tmp_path / "cache"
        cfg = (
            CacheConfig()
            .with_name(f"hostile-{umask}-{pack_below}")
            .with_disk_cache(cache_dir, "64MB")
            .with_disk_packing(pack_below)
        )
        store = CachedStore(MemoryStore(), cfg.with_prefetch(0))
        outside_before = _tree(tmp_path) - _tree(cache_dir)
        for i, key in enumerate(HOSTILE_KEYS):
            value = f"value {i}".encode()
            sync(store.set(key, cpu.Buffer.from_bytes(value)))
            store.cache.memory_tier.clear()
            got = sync(store.get(key, P))
            assert got is not None and got.to_bytes() == value, key
        store.cache.flush()
        # through the cache below the store too: any str, even lone surrogates
        cache: HybridCache = store.cache
        for key in [*HOSTILE_KEYS, "\udcff/lone-surrogate"]:
            cache.put(key, b"raw", kind="chunk", namespace="../../ns")
        cache.flush()
        for i, key in enumerate(HOSTILE_KEYS):
            assert cache.disk_tier is not None and cache.disk_tier.get(key) == b"raw"
            assert sync(store.get(key, P)).to_bytes() == f"value {i}".encode()  # type: ignore[union-attr]
        assert _tree(tmp_path) - _tree(cache_dir) == outside_before | {cache_dir}
        assert not any(p.exists() for p in escape)
        if passwd_before is not None:
            assert passwd.stat().st_mtime_ns == passwd_before.st_mtime_ns
        _check_folder(cache_dir)
        for key in HOSTILE_KEYS:
            sync(store.delete(key))
        store.cache.close()
        _check_folder(cache_dir)
    finally:
        os.umask(old_umask)


def test_existing_folder_is_made_private(tmp_path: pathlib.Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o777)
    os.chmod(cache_dir, 0o777)
    store = faults.cached(tmp_path / "data", cache_dir, "private")
    store.set_sync("v/c/0", faults.buf(b"x"))
    store.get_sync("v/c/0")
    store.cache.flush()
    _check_folder(cache_dir)
    store.cache.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
@pytest.mark.parametrize("how", ["folder", "symlink"])
def test_folder_owned_by_another_user_is_refused(tmp_path: pathlib.Path, how: str) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    path = theirs if how == "folder" else tmp_path / "link"
    if how == "symlink":
        path.symlink_to(theirs)
    store = faults.cached(tmp_path / "data", path, f"theirs-{how}")
    with pytest.raises(PermissionError) as info:
        store.get_sync("v/c/0")
    message = str(info.value)
    assert str(theirs) in message and "owned by uid 12345" in message and "refusing" in message
    assert list(theirs.iterdir()) == []  # nothing created in it


# --------------------------------------------------------------------------- credentials

SECRET = "zcacheSECRETmarker0123456789"
TOKEN = "zcacheTOKENmarker9876543210"
KEY_ID = "ZCACHEKEYMARKER0000"


def _assert_clean(text: str, where: str) -> None:
    for marker in (SECRET, TOKEN, KEY_ID):
        assert marker not in text, f"{marker} found in {where}"


def _assert_clean_bytes(data: bytes, where: str) -> None:
    for marker in (SECRET, TOKEN, KEY_ID):
        assert marker.encode() not in data, f"{marker} found in {where}"
        assert marker.encode("utf-16-le") not in data, f"{marker} found in {where}"


def test_credentials_never_leak(
    s3_server: LocalS3Server,
    s3_bucket: str,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"s3://{s3_bucket}/secret.zarr"
    expected = xr.Dataset({"t": (("x",), np.arange(16.0))})
    write_zarr(expected, url, s3_server.storage_options(), zarr_format=3)
    # moto accepts any credentials; the endpoint carries user:password too
    endpoint = s3_server.endpoint_url.replace("http://", f"http://{KEY_ID}:{SECRET}@")
    opts = s3_server.storage_options(key=KEY_ID, secret=SECRET, token=TOKEN)
    opts["endpoint_url"] = s3_server.endpoint_url
    opts_userinfo = dict(opts, endpoint_url=endpoint)
    cfg = faults.config(tmp_path / "cache", "secrets").with_name("secrets")
    with caplog.at_level(logging.DEBUG, logger="xarray_zcache"):
        ds = xr.open_dataset(url, engine="zcache", storage_options=opts, cache_config=cfg)
        xr.testing.assert_identical(ds.load(), expected)
        store = xarray_zcache.open_store(url, storage_options=opts, cache_config=cfg)
        sync(store.get("t/c/0", P))
        store.cache.flush()
        other = CachedStore(
            store.inner, cfg, namespace=xarray_zcache.store.store_namespace(store.inner)
        )
        texts = {
            "repr(store)": repr(store),
            "str(store)": str(store),
            "namespace": store.namespace,
            "namespace (userinfo endpoint)": xarray_zcache.store.store_namespace(
                xarray_zcache.backend._inner_store(url, opts_userinfo, True)
            ),
            "repr(other)": repr(other),
            "repr(cache)": repr(store.cache),
            "stats str": str(store.stats()),
            "stats html": store.stats()._repr_html_(),
            "stats dict": json.dumps(store.stats().to_dict()),
            "config": repr(cfg) + str(cfg) + json.dumps(cfg.to_dict()),
            "dask token": repr(store.__dask_tokenize__()),
        }
        store.cache.close()
    texts["logs"] = "\n".join(r.getMessage() for r in caplog.records)
    for where, text in texts.items():
        _assert_clean(text, where)
    cache_dir = tmp_path / "cache"
    for path in cache_dir.rglob("*"):
        if path.is_file():
            _assert_clean_bytes(path.read_bytes(), str(path.relative_to(cache_dir)))


def test_credentials_never_reach_the_cluster_stats(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: pathlib.Path
) -> None:
    distributed = pytest.importorskip("distributed")
    import xarray_zcache.distributed as zd

    url = f"s3://{s3_bucket}/cluster.zarr"
    write_zarr(
        xr.Dataset({"t": (("x",), np.arange(32.0))}),
        url,
        s3_server.storage_options(),
        zarr_format=3,
    )
    opts = s3_server.storage_options(key=KEY_ID, secret=SECRET, token=TOKEN)
    cfg = faults.config(tmp_path / "cache", "cluster-secrets")._replace(report_interval=0.1)
    with (
        distributed.LocalCluster(
            n_workers=1, processes=False, threads_per_worker=2, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        zd.install(client, cfg)
        ds = xr.open_dataset(
            url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg
        )
        ds.t.sum().compute()
        ds.t.sum().compute()
        stats: Any = None
        for _ in range(100):
            stats = zd.cluster_stats(client)
            if stats.total.requests_saved > 0:
                break
            import time

            time.sleep(0.1)
        texts = {"cluster stats": repr(stats) + str(stats)}
        texts["cluster stats (dict)"] = json.dumps(
            {
                "total": stats.total.to_dict(),
                "workers": {w: s.to_dict() for w, s in stats.workers.items()},
            },
            default=str,
        )
        try:
            from xarray_zcache.distributed.dashboard import snapshot

            texts["dashboard json"] = json.dumps(snapshot(client), default=str)
        except (ImportError, RuntimeError):
            pass
    for where, text in texts.items():
        _assert_clean(text, where)


# --------------------------------------------------------------------------- no unpickling

_FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("numpy", "load"),
    ("np", "load"),
    ("builtins", "eval"),
    ("builtins", "exec"),
}


def test_nothing_read_from_disk_is_unpickled() -> None:
    """No unpickling (or marshal, shelve, unsafe YAML, eval) anywhere in the package."""
    package = pathlib.Path(xarray_zcache.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                for name in [module, *names]:
                    if name.split(".")[0] in ("pickle", "cPickle", "marshal", "shelve", "dill"):
                        offenders.append(f"{path.name}:{node.lineno} imports {name}")
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    if (func.value.id, func.attr) in _FORBIDDEN_CALLS:
                        offenders.append(f"{path.name}:{node.lineno} {func.value.id}.{func.attr}")
                elif isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                    offenders.append(f"{path.name}:{node.lineno} {func.id}()")
    assert offenders == []
