"""``python -m xarray_zcache.demo`` (what ``make demo`` runs)."""

import sys

from xarray_zcache.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
