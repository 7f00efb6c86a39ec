"""Makes `xarray_zcache.decoded_pipeline.DecodedCodecPipeline` zarr's codec pipeline when
imported (`install`: only over zarr's default, only with ``zcache.decoded-array-api`` on).

Imported by `xarray_zcache.store`, so that every `CachedStore` zarr opens an array over
is read through the decoded tier; the decoded modules do not import the store (they
read through `xarray_zcache.decoded_source.DecodedSource`).
"""

from __future__ import annotations

from xarray_zcache.decoded_pipeline import install

__all__: list[str] = []

install()
