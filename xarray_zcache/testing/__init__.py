"""Testing utilities for xarray-zcache (local S3 server with request accounting)."""
